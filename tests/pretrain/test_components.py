"""Trainer pieces: checkpoint discovery, loss guard, schedules, FLOPs."""

import json
import math

import pytest

from looplm import preset_config
from runtime import checkpoint
from pretrain.config import load_config
from pretrain.engine import entropy_beta, lr_factor, param_groups
from pretrain.metrics import LossGuard, flops_per_token
from helpers.models import tiny_model


def _ckpt(root, step, complete=True):
    d = root / "checkpoints" / f"global_step{step}"
    d.mkdir(parents=True)
    if complete:
        (d / checkpoint.STATE_FILE).write_text(json.dumps({"step": step}))
    return d


def test_an_interrupted_save_is_never_resumed_from(tmp_path):
    assert checkpoint.find_resume(tmp_path) is None
    _ckpt(tmp_path, 100)
    good = _ckpt(tmp_path, 200)
    (tmp_path / "checkpoints" / "latest").write_text("global_step200")
    _ckpt(tmp_path, 300, complete=False)  # killed while writing: no trainer state, latest not moved
    assert checkpoint.find_resume(tmp_path) == good
    (tmp_path / "checkpoints" / "latest").write_text("global_step300")  # latest naming it: stop, never fall back
    with pytest.raises(checkpoint.CheckpointError, match="global_step300, which is incomplete") as err:
        checkpoint.find_resume(tmp_path)
    assert str(good) in str(err.value)  # the complete ones are offered
    (tmp_path / "checkpoints" / "latest").unlink()  # no latest at all: the highest complete one (with a note)
    assert checkpoint.find_resume(tmp_path) == good


def test_loss_guard_flags_nan_and_spikes_and_counts_streaks():
    guard = LossGuard(factor=2.0, window=3, max_bad=2)
    assert guard.check(float("nan")) is not None  # even before the window is full
    for loss in (3.0, 3.1, 2.9):
        assert guard.check(loss) is None
    assert "spike" in guard.check(6.5)
    assert guard.bad_in_a_row == 1 and guard.check(float("inf")) and guard.bad_in_a_row == 2
    assert guard.check(3.0) is None and guard.bad_in_a_row == 0
    restored = LossGuard(2.0, 3, 2, **guard.state())
    assert restored.check(6.5) is not None and list(restored.recent) == list(guard.recent)


def test_schedules():
    cfg = load_config("configs/smoke.yaml", ["train.max_steps=100", "optim.warmup_steps=10",
                                             "optim.decay_fraction=0.2", "optim.min_lr_ratio=0.1",
                                             "ouro.beta_schedule=[[0, 0.1], [150, 0.05]]"])
    assert lr_factor(0, cfg) == 0.1 and lr_factor(9, cfg) == 1.0
    assert lr_factor(50, cfg) == 1.0 and lr_factor(80, cfg) == 1.0
    assert math.isclose(lr_factor(90, cfg), 0.55) and math.isclose(lr_factor(100, cfg), 0.1)
    cfg.optim.schedule = "cosine"
    assert math.isclose(lr_factor(10, cfg), 1.0) and math.isclose(lr_factor(55, cfg), 0.55)
    assert math.isclose(lr_factor(100, cfg), 0.1)
    assert [entropy_beta(s, cfg, 0.07) for s in (0, 149, 150)] == [0.1, 0.1, 0.05]
    cfg.ouro.beta_schedule = []
    assert entropy_beta(10, cfg, 0.07) == 0.07


def test_no_weight_decay_on_norms_biases_and_gate():
    model = tiny_model()
    decay, no_decay = param_groups(model, 0.1)
    assert len(param_groups(model.requires_grad_(False), 0.1)) == 0
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(names[id(p)].endswith("proj.weight") or "embed" in names[id(p)] or "lm_head" in names[id(p)]
               for p in decay["params"])
    skipped = {names[id(p)] for p in no_decay["params"]}
    assert "model.early_exit_gate.weight" in skipped and "model.early_exit_gate.bias" in skipped
    assert all(n in skipped for n in names.values() if "norm" in n)
    assert no_decay["weight_decay"] == 0.0


def test_flops_per_token_matches_the_spec_estimate_for_ouro_1p4b():
    # spec/ouro.md: ~6 x (4 x 1.233B + 4 x 0.10B) ~ 32 GFLOP/token (non-attention)
    config = preset_config("ouro-1.4b")
    no_attention = flops_per_token(config, seq_len=0)
    assert 31e9 < no_attention < 33e9
    assert flops_per_token(config, 4096) > no_attention
