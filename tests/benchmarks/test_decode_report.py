"""The decode benchmark's report names the model it measured: a saved model's own dimensions, not
the size flags' defaults (which size only the random model); the committed reports do too."""

import json
import subprocess
from argparse import Namespace

import pytest

from benchmarks.decode_throughput import MODEL_KEYS, SIZE_FLAGS, measured_config
from helpers.models import tiny_model
from helpers.training import REPO


def args(**kw):
    base = {"model": None, "preset": "tiny", "gate_std": None, "vocab": 8192, "hidden": 256, "layers": 4, "steps": 4,
            "kv_sharing": "last", "batch": [1], "output": "x.json"}
    return Namespace(**{**base, **kw})


def test_a_saved_model_is_recorded_with_its_own_dimensions():
    model = tiny_model(vocab_size=320, total_ut_steps=3)
    report = measured_config(args(model="runs/smoke/hf"), model)
    assert not set(SIZE_FLAGS) & set(report) and "output" not in report
    assert report["measured_model"] == {k: getattr(model.config, k) for k in MODEL_KEYS}
    assert report["measured_model"]["vocab_size"] == 320 and report["measured_model"]["total_ut_steps"] == 3
    random = measured_config(args(), model)  # a random model: the flags that sized it stay
    assert random["hidden"] == 256 and random["measured_model"]["hidden_size"] == model.config.hidden_size


def decode_reports():
    return subprocess.run(["git", "ls-files", "benchmarks/results/decode_*.json"], cwd=REPO, capture_output=True,
                          text=True, check=True).stdout.split()


@pytest.mark.parametrize("path", decode_reports())
def test_committed_decode_reports_of_a_saved_model_name_its_dimensions(path):
    config = json.loads((REPO / path).read_text())["config"]
    if config.get("model"):
        assert "measured_model" in config and not set(SIZE_FLAGS) & set(config), path
