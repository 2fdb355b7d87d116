"""Ulysses sequence parallelism (train.sequence_parallel) on 2 CPU ranks with gloo, under the real
deepspeed runner: the losses and gradient norms of a single process on the same global batch (stage
I and II, ZeRO 0-2, packed documents), every parameter's gradient of one step, SIGKILL + resume
bit-exactness, config errors. (Weights after AdamW are not compared: Adam turns float-noise-sized
gradients of rarely used embedding rows into lr-sized steps of either sign.)"""

import json
import subprocess

import pytest
import torch

from helpers.training import (REPO, base_overrides, checkpoint_weights, deepspeed_cmd, launch, metrics,
                              run_in_process, single_and_parallel_runs, step_losses)
from pretrain.config import ConfigError, load_config, validate

pytestmark = pytest.mark.slow
STEPS, SAVE_AT = 4, 2
SP = {"train.sequence_parallel": 2}
CASES = {"stage1_zero0": {"train.zero_stage": 0}, "stage1_zero2": {"train.zero_stage": 2},
         "stage2_zero1": {"train.zero_stage": 1, "ouro.objective": "stage2"}}


def overrides(corpus, out, **extra):
    return base_overrides(corpus, out, **{"train.max_steps": STEPS, "train.save_every": SAVE_AT,
                                          "train.keep_last": 5, **extra})


@pytest.fixture(scope="module")
def runs(corpus, tmp_path_factory):
    """Single-process references and 2-rank sequence-parallel runs (par_*) on the same global batch."""
    root = tmp_path_factory.mktemp("sp")
    single_and_parallel_runs(root, CASES, lambda out, **extra: overrides(corpus, out, **extra), SP)
    return root, list(CASES)


def test_the_data_has_packed_documents(corpus):
    """The comparison below is about packed documents only if the batches hold several per row."""
    from pretrain.data import IndexedDataset, PackedDataset

    rows = PackedDataset(IndexedDataset(str(corpus / "train")), 32, 1234, "train", 0.02, wrap=True)
    restarts = sum(int((torch.as_tensor(rows[i]["position_ids"])[1:] == 0).sum()) for i in range(8))
    assert restarts >= 8


def test_sequence_parallel_losses_equal_a_single_process(runs):
    root, names = runs
    for name in names:
        single, split = step_losses(root / f"single_{name}"), step_losses(root / f"par_{name}")
        assert sorted(split) == sorted(single) == list(range(1, STEPS + 1)), name
        for step, value in single.items():
            assert split[step] == pytest.approx(value, rel=2e-5), (name, step)


def test_sequence_parallel_gradient_norms_equal_a_single_process(runs):
    """The global gradient norm DeepSpeed reports after its reduction (ZeRO 1-2), every step."""
    root, names = runs
    for name in names:
        single, split = [[r["grad_norm"] for r in metrics(root / f"{side}_{name}") if "loss" in r]
                         for side in ("single", "par")]
        if name.endswith("zero0"):  # ZeRO-0 reports no norm
            continue
        assert split == pytest.approx(single, rel=1e-5) and all(x > 0 for x in single), name


def test_sequence_parallel_gradients_equal_a_single_process(tmp_path):
    """Every parameter's gradient of one step, stage I and II, packed documents with an ignored target:
    slices on 2 ranks summed over the group against the whole sequence in one process."""
    out = tmp_path / "grads.json"
    cmd = deepspeed_cmd(2) + ["tests/helpers/sp_gradients.py", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for objective, r in json.loads(out.read_text()).items():
        assert r["same_parameters"] and r["parameters"] > 0, objective
        assert r["loss"][1] == pytest.approx(r["loss"][0], rel=1e-6), objective
        assert r["max_abs_diff"] <= 1e-6 * max(r["max_abs_grad"], 1.0), objective


def test_sigkill_then_resume_with_sequence_parallelism_is_bit_identical(runs, corpus, tmp_path):
    root, _ = runs
    out = tmp_path / "killed"
    args = overrides(corpus, out, **{"train.zero_stage": 2}, **SP)
    killed = launch(2, args + [f"fault.kill_at_step={SAVE_AT + 1}"], check=False)
    assert killed.returncode != 0 and max(step_losses(out)) == SAVE_AT
    launch(2, args)
    assert step_losses(out) == step_losses(root / "par_stage1_zero2")  # exact floats, every step
    final = checkpoint_weights(out / "checkpoints" / f"global_step{STEPS}")
    reference = checkpoint_weights(root / "par_stage1_zero2" / "checkpoints" / f"global_step{STEPS}")
    assert all(torch.equal(final[k], reference[k]) for k in reference)


def test_resuming_onto_another_sequence_parallel_layout_is_refused_with_the_way_out(runs, corpus, tmp_path):
    """DeepSpeed's universal conversion (ds_to_universal) fails on a sequence-parallel ZeRO checkpoint."""
    import shutil

    root, _ = runs
    shutil.copytree(root / "par_stage1_zero2", tmp_path / "copy")
    with pytest.raises(ConfigError, match="universal checkpoint cannot convert.*model.init_from"):
        run_in_process(overrides(corpus, tmp_path / "copy", **{"train.zero_stage": 2, "train.max_steps": STEPS + 1}))


@pytest.mark.parametrize("extra, world, message", [
    ({"train.sequence_parallel": 2}, 3, "do not split"),
    ({"train.sequence_parallel": 3, "data.seq_len": 30}, 3, "num_attention_heads"),
    ({"train.sequence_parallel": 4, "data.seq_len": 32}, 4, "num_key_value_heads"),
    ({"train.sequence_parallel": 2, "data.seq_len": 33}, 2, "divisible"),
    ({"train.sequence_parallel": 0}, 1, "train.sequence_parallel"),
])
def test_bad_sequence_parallel_settings_are_named(corpus, tmp_path, extra, world, message):
    with pytest.raises(ConfigError, match=message):
        validate(load_config(REPO / "configs/smoke.yaml", base_overrides(corpus, tmp_path, **extra)), world)
