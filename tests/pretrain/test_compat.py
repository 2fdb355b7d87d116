"""Checkpoints written by an earlier looplm still resume: tests/fixtures/pretrain_checkpoint_v1 is the
step-3 checkpoint of a 5-step run made by the code before the runtime/ refactor (issue 14), with
that run's losses; resuming it now must continue exactly as that run did."""

import json
import shutil
from pathlib import Path

import pytest

from tests.helpers.training import base_overrides, run_in_process, step_losses

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "pretrain_checkpoint_v1"


def test_a_checkpoint_of_the_previous_code_resumes_exactly(corpus, tmp_path):
    reference = json.loads((FIXTURE / "reference.json").read_text())
    assert reference["corpus"] == {"seed": 1234, "mano_train": 3000}  # the session corpus (tests/pretrain/conftest.py)
    out = tmp_path / "run"
    shutil.copytree(FIXTURE / "checkpoints", out / "checkpoints")
    run_in_process(base_overrides(corpus, out, **{"train.max_steps": 5, "train.save_every": 3}))
    losses = step_losses(out)
    assert sorted(losses) == [4, 5]  # resumed after step 3, not started again
    for step in (4, 5):
        assert losses[step] == pytest.approx(reference["losses"][str(step)], rel=1e-6, abs=0)
