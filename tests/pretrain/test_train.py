"""The trainer in this process (world size 1): NaN/spike skipping, abort, stage II, export round trip."""

import math

import pytest
import torch

from helpers.training import REPO, base_overrides, metrics, run_in_process
from looplm import LoopLMForCausalLM
from pretrain.config import load_config
from pretrain.engine import build_model
from pretrain.export import export


def weights_of(engine):
    return {k: v.detach().clone() for k, v in engine.module.state_dict().items()}


def test_a_nan_step_is_skipped_and_leaves_the_weights_alone(corpus, tmp_path):
    one = weights_of(run_in_process(base_overrides(corpus, tmp_path / "a", **{"train.max_steps": 1})))
    engine = run_in_process(base_overrides(corpus, tmp_path / "b", **{"train.max_steps": 2, "fault.nan_at_steps": "[2]"}))
    two = weights_of(engine)
    assert all(torch.equal(one[k], two[k]) for k in one)
    records = [r for r in metrics(tmp_path / "b") if "loss" in r]
    assert [r["skipped"] for r in records] == [False, True] and "non-finite" in records[1]["skip_reason"]
    three = weights_of(run_in_process(base_overrides(corpus, tmp_path / "c", **{"train.max_steps": 3,
                                                                                  "fault.nan_at_steps": "[2]"})))
    assert any(not torch.equal(two[k], three[k]) for k in two)  # training goes on after the bad step


def test_consecutive_bad_steps_abort_with_a_clear_error(corpus, tmp_path):
    with pytest.raises(RuntimeError, match="3 consecutive bad steps"):
        run_in_process(base_overrides(corpus, tmp_path / "r", **{"train.max_steps": 6, "train.max_bad_steps": 3,
                                                                  "fault.nan_at_steps": "[2, 3, 4]"}))


def test_stage2_trains_only_the_gate(corpus, tmp_path):
    overrides = base_overrides(corpus, tmp_path / "s2", **{"train.max_steps": 2, "ouro.objective": "stage2"})
    before = build_model(load_config(REPO / "configs/smoke.yaml", overrides)).state_dict()
    engine = run_in_process(overrides)
    after = weights_of(engine)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("model.early_exit_gate.") for k in changed), changed


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_export_loads_with_the_logits_of_the_training_engine(corpus, tmp_path, zero_stage):
    engine = run_in_process(base_overrides(corpus, tmp_path / "run", **{"train.max_steps": 2,
                                                                         "train.zero_stage": zero_stage}))
    folder = export(tmp_path / "run", tmp_path / "hf")
    assert (folder / "tokenizer.model").exists()
    exported = LoopLMForCausalLM.from_pretrained(folder).eval()
    ids = torch.randint(0, 256, (2, 12))
    engine.module.eval()
    with torch.no_grad():
        expected = engine.module(ids, use_cache=False, output_step_logits=True)
        got = exported(ids, use_cache=False, output_step_logits=True)
    for a, b in zip(got.step_logits, expected.step_logits):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_metrics_record_what_the_issue_lists(corpus, tmp_path):
    run_in_process(base_overrides(corpus, tmp_path / "m", **{"train.max_steps": 2, "train.eval_max_prompts": 4,
                                                              "logging.wandb": True}))
    assert list((tmp_path / "m" / "wandb").glob("offline-run-*")), "wandb (offline) wrote no run"
    records = metrics(tmp_path / "m")
    step = records[0]
    for key in ("loss", "loss_per_pass", "exit_probs", "exit_entropy", "gate_mean", "grad_norm", "lr",
                "tokens_per_s", "tflops_per_device", "mfu", "consumed_samples", "tokens_seen"):
        assert key in step, key
    assert len(step["loss_per_pass"]) == 3 and abs(sum(step["exit_probs"]) - 1) < 1e-6
    assert len([r for r in records if "valid_loss_per_pass" in r][-1]["valid_loss_per_pass"]) == 3
    memory = records[-1]["memory_per_rank"]
    assert len(memory) == 1 and memory[0]["optimizer_state_mib"] > 0
    final = [r for r in records if "accuracy" in r][-1]
    assert set(final["accuracy"]) == {f"{t}@{d}" for t in ("mano", "multihop") for d in ("1", "2", "3", "gate")}


def test_activation_checkpointing_and_retention(corpus, tmp_path):
    """Checkpointing every (pass, layer) changes no loss; only the last keep_last checkpoints stay."""
    run_in_process(base_overrides(corpus, tmp_path / "plain", **{"train.max_steps": 3}))
    run_in_process(base_overrides(corpus, tmp_path / "ac", **{"train.max_steps": 3, "train.activation_checkpointing": True,
                                                               "train.save_every": 1, "train.keep_last": 2}))
    plain, ac = [[r["loss"] for r in metrics(tmp_path / d) if "loss" in r] for d in ("plain", "ac")]
    assert ac == pytest.approx(plain, rel=1e-6)
    kept = sorted(p.name for p in (tmp_path / "ac" / "checkpoints").glob("global_step*"))
    assert kept == ["global_step2", "global_step3"]
    assert (tmp_path / "ac" / "checkpoints" / "latest").read_text() == "global_step3"


def test_bf16_training_runs_with_fp32_exit_math(corpus, tmp_path):
    engine = run_in_process(base_overrides(corpus, tmp_path / "bf16", **{"train.max_steps": 2, "train.bf16": True}))
    assert next(engine.module.parameters()).dtype == torch.bfloat16
    records = [r for r in metrics(tmp_path / "bf16") if "loss" in r]
    assert all(math.isfinite(r["loss"]) for r in records) and records[1]["loss"] < records[0]["loss"] + 0.5
    assert abs(sum(records[0]["exit_probs"]) - 1) < 1e-5


def test_a_validation_split_smaller_than_a_batch_logs_no_number(corpus, tmp_path, capsys):
    """An empty validation batch set is reported as such, never as a CE of 0.000."""
    run_in_process(base_overrides(corpus, tmp_path / "v", **{"train.max_steps": 1, "data.valid_fraction": 0.0003,
                                                              "train.micro_batch": 8}))
    evals = [r for r in metrics(tmp_path / "v") if "loss" not in r and "step" in r]
    assert evals and not any("valid_loss_per_pass" in r for r in evals)
    err = capsys.readouterr().err
    assert "no validation CE" in err and "raise data.valid_fraction" in err


def test_export_refuses_a_non_empty_output_and_replaces_it_whole_with_overwrite(corpus, tmp_path, capsys):
    from pretrain.export import main as export_main

    run_in_process(base_overrides(corpus, tmp_path / "run", **{"train.max_steps": 1}))
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "mine.txt").write_text("a user's file")
    with pytest.raises(SystemExit) as exit_info:
        export_main(["--checkpoint", str(tmp_path / "run"), "--output", str(tmp_path / "hf")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "hf") in err and "--overwrite" in err
    assert [p.name for p in (tmp_path / "hf").iterdir()] == ["mine.txt"]  # nothing written into it
    export_main(["--checkpoint", str(tmp_path / "run"), "--output", str(tmp_path / "hf"), "--overwrite"])
    assert (tmp_path / "hf" / "config.json").exists() and not (tmp_path / "hf" / "mine.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("hf")) == ["hf"]  # no .partial / .old
    LoopLMForCausalLM.from_pretrained(tmp_path / "hf")


def test_the_entropy_weight_reaches_the_loss_each_step_without_touching_the_model_config(corpus, tmp_path):
    """ouro.beta_schedule is passed to the loss per step: the same first step (same weights and batch)
    with beta 0.5 has a lower loss than with beta 0 (the entropy term is subtracted), the logged beta
    follows the schedule, and the model's config keeps its own entropy_beta."""
    first = {}
    for beta in (0.0, 0.5):
        engine = run_in_process(base_overrides(corpus, tmp_path / f"b{beta}", **{
            "train.max_steps": 3, "ouro.beta_schedule": f"[[0, {beta}], [2, 0.25]]"}))
        records = [r for r in metrics(tmp_path / f"b{beta}") if "loss" in r]
        assert [r["beta"] for r in records] == [beta, beta, 0.25]
        assert engine.module.config.entropy_beta == build_model(load_config(
            REPO / "configs/smoke.yaml", base_overrides(corpus, tmp_path))).config.entropy_beta
        first[beta] = records[0]["loss"]
    assert first[0.5] < first[0.0]


def test_compiled_layers_train_like_eager_under_zero3_with_activation_checkpointing(corpus, tmp_path):
    """train.compile (regional compilation of the N shared layers) under DeepSpeed ZeRO-3 with every
    (pass, layer) checkpointed: the same losses as the eager run (inductor reorders float sums)."""
    extra = {"train.max_steps": 3, "train.zero_stage": 3, "train.activation_checkpointing": True}
    run_in_process(base_overrides(corpus, tmp_path / "eager", **extra))
    run_in_process(base_overrides(corpus, tmp_path / "compiled", **extra, **{"train.compile": True}))
    eager, compiled = [[r["loss"] for r in metrics(tmp_path / d) if "loss" in r] for d in ("eager", "compiled")]
    assert len(eager) == 3 and compiled == pytest.approx(eager, rel=1e-4)
