"""Tensor parallelism (train.tensor_parallel, DeepSpeed AutoTP) on 2 CPU ranks with gloo, under the
real deepspeed runner: the losses and gradient norms of a single process on the same global batch
(stage I and II, ZeRO 0-2, packed documents), every parameter's gradient of one step, the exported folder (shards joined) gives the single
process's logits, SIGKILL + resume bit-exactness, config errors."""


import json
import subprocess

import pytest
import torch

from helpers.training import (REPO, base_overrides, deepspeed_cmd, launch, metrics, run_in_process,
                              single_and_parallel_runs, step_losses)
from pretrain.config import ConfigError, load_config, validate

pytestmark = pytest.mark.slow
STEPS, SAVE_AT = 4, 2
TP = {"train.tensor_parallel": 2}
CASES = {"stage1_zero1": {"train.zero_stage": 1}, "stage1_zero2": {"train.zero_stage": 2},
         "stage2_zero0": {"train.zero_stage": 0, "ouro.objective": "stage2"}}


def overrides(corpus, out, **extra):
    return base_overrides(corpus, out, **{"train.max_steps": STEPS, "train.save_every": SAVE_AT,
                                          "train.keep_last": 5, **extra})


@pytest.fixture(scope="module")
def runs(corpus, tmp_path_factory):
    """Single-process references and 2-rank tensor-parallel runs (par_*) on the same global batch."""
    root = tmp_path_factory.mktemp("tp")
    single_and_parallel_runs(root, CASES, lambda out, **extra: overrides(corpus, out, **extra), TP)
    return root


def test_tensor_parallel_losses_and_gradient_norms_equal_a_single_process(runs):
    for name in CASES:
        single, split = step_losses(runs / f"single_{name}"), step_losses(runs / f"par_{name}")
        assert sorted(split) == sorted(single) == list(range(1, STEPS + 1)), name
        for step, value in single.items():
            assert split[step] == pytest.approx(value, rel=2e-5), (name, step)
        norms = [[r["grad_norm"] for r in metrics(runs / f"{side}_{name}") if "loss" in r] for side in ("single", "par")]
        if norms[0][0] is not None:  # ZeRO-0 reports none
            assert norms[1] == pytest.approx(norms[0], rel=1e-5), name


def test_tensor_parallel_gradients_equal_a_single_process(tmp_path):
    """Every parameter's gradient of one step, stage I and II, packed documents: AutoTP shards gathered
    over the group and joined, against the whole model back-propagated in one process."""
    out = tmp_path / "grads.json"
    cmd = deepspeed_cmd(2) + ["tests/helpers/tp_gradients.py", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for objective, r in json.loads(out.read_text()).items():
        assert r["sharded_parameters"] == 14 and r["parameters_compared"] == 27, objective  # 7 projections x 2 layers
        assert r["loss"][1] == pytest.approx(r["loss"][0], rel=1e-6), objective
        assert r["max_abs_diff"] <= 2e-6 * max(r["max_abs_grad"], 1.0), objective


def test_tensor_parallel_export_joins_the_shards(runs, tmp_path):
    """The exported folder (AutoTP shards joined) computes the single process's logits."""
    from looplm import LoopLMForCausalLM
    from pretrain.export import export

    ids = torch.randint(0, 256, (2, 12))
    for name in CASES:
        logits = []
        for side in ("single", "par"):
            model = LoopLMForCausalLM.from_pretrained(export(runs / f"{side}_{name}", tmp_path / f"{side}_{name}")).eval()
            with torch.no_grad():
                logits.append(model(ids, use_cache=False).logits)
        torch.testing.assert_close(logits[1], logits[0], atol=2e-4, rtol=2e-4, msg=name)


def test_sigkill_then_resume_with_tensor_parallelism_is_bit_identical(runs, corpus, tmp_path):
    out = tmp_path / "killed"
    args = overrides(corpus, out, **CASES["stage1_zero1"], **TP)
    killed = launch(2, args + [f"fault.kill_at_step={SAVE_AT + 1}"], check=False)
    assert killed.returncode != 0 and max(step_losses(out)) == SAVE_AT
    launch(2, args)
    assert step_losses(out) == step_losses(runs / "par_stage1_zero1")  # exact floats, every step


def test_resuming_with_another_tensor_parallel_size_is_refused(runs, corpus, tmp_path):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(runs / "par_stage1_zero1", out)
    with pytest.raises(ConfigError, match="tensor_parallel=1.*written with 2"):
        run_in_process(overrides(corpus, out, **CASES["stage1_zero1"], **{"train.max_steps": STEPS + 1}))


@pytest.mark.parametrize("extra, world, message", [
    ({"train.tensor_parallel": 2, "train.zero_stage": 3}, 2, "ZeRO 0-2"),
    ({"train.tensor_parallel": 2, "train.sequence_parallel": 2}, 4, "not combined"),
    ({"train.tensor_parallel": 4}, 4, "num_key_value_heads"),
    ({"train.tensor_parallel": 2}, 3, "do not split"),
])
def test_bad_tensor_parallel_settings_are_named(corpus, tmp_path, extra, world, message):
    with pytest.raises(ConfigError, match=message):
        validate(load_config(REPO / "configs/smoke.yaml", base_overrides(corpus, tmp_path, **extra)), world)
