"""`python -m pretrain.plot RUN_DIR` draws a real run's metrics; bad input names the file."""

import json

import pytest

from helpers.training import base_overrides, metrics, run_in_process
from pretrain.data import DataError
from pretrain.plot import main, plot_run, read_metrics


def test_plot_draws_a_tiny_runs_metrics(corpus, tmp_path):
    run = tmp_path / "run"
    run_in_process(base_overrides(corpus, run, **{"train.max_steps": 3, "train.eval_every": 2,
                                                  "train.eval_max_prompts": 4}))
    train, evals = read_metrics(run)
    written = [r for r in metrics(run) if "loss_per_pass" in r]
    assert [r["step"] for r in train] == [r["step"] for r in written] == [1, 2, 3]
    assert [r["step"] for r in evals] == [2, 3] and all("accuracy" in r for r in evals)

    main([str(run)])
    import matplotlib.image

    image = matplotlib.image.imread(run / "run.png")
    assert image.shape[:2] == (640, 1200)  # 15 x 8 inches at 80 dpi
    assert image[..., :3].std() > 0.05  # something was drawn
    other = plot_run(run, tmp_path / "elsewhere.png")
    assert other.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_refuses_a_folder_without_metrics_and_a_broken_line(tmp_path):
    with pytest.raises(DataError, match="metrics.jsonl does not exist"):
        read_metrics(tmp_path)
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss_per_pass": [1.0]}) + "\n{oops\n")
    with pytest.raises(DataError, match=r"metrics.jsonl:2 is not a JSON line"):
        read_metrics(tmp_path)
    with pytest.raises(SystemExit):
        main([str(tmp_path / "missing")])
