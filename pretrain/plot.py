"""Pictures of one pretraining run from its `metrics.jsonl`: CE per pass (training and validation),
the exit distribution, its entropy, the gate values, and held-out accuracy by exit depth over steps.

    python -m pretrain.plot RUN_DIR [--output FILE.png]     # default RUN_DIR/run.png
"""

import argparse
import json
from pathlib import Path

from runtime.cli import cli_main

from .data.errors import DataError


def read_metrics(run_dir: str | Path) -> tuple[list[dict], list[dict]]:
    """(training records, evaluation records) of `RUN_DIR/metrics.jsonl`, in step order; a resumed
    run's repeated steps keep their last record."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise DataError(f"{path} does not exist: pass the run's train.output_dir (the folder holding metrics.jsonl)")
    train, evals = {}, {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{number} is not a JSON line ({err})") from err
        if "loss_per_pass" in record and "skip_reason" not in record:
            train[record["step"]] = record
        if "valid_loss_per_pass" in record or "accuracy" in record:
            evals[record["step"]] = record
    if not train and not evals:
        raise DataError(f"{path} holds no training or evaluation record yet")
    return [train[s] for s in sorted(train)], [evals[s] for s in sorted(evals)]


def plot_run(run_dir: str | Path, output: str | Path | None = None) -> Path:
    """Draw the run's six panels into one PNG; returns its path."""
    train, evals = read_metrics(run_dir)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    output = Path(output) if output else Path(run_dir) / "run.png"
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    steps = [r["step"] for r in train]

    def per_pass(ax, records, key, title, ylabel):
        xs = [r["step"] for r in records if r.get(key)]
        rows = [r[key] for r in records if r.get(key)]
        for t in range(len(rows[0]) if rows else 0):
            ax.plot(xs, [row[t] for row in rows], marker="." if len(xs) < 30 else None, label=f"pass {t + 1}")
        ax.set(title=title, xlabel="step", ylabel=ylabel)
        if rows:
            ax.legend(fontsize=8)

    per_pass(axes[0, 0], train, "loss_per_pass", "training CE per pass", "CE (nats)")
    per_pass(axes[0, 1], evals, "valid_loss_per_pass", "validation CE per pass", "CE (nats)")
    if train:
        probs = list(zip(*[r["exit_probs"] for r in train]))
        axes[0, 2].stackplot(steps, probs, labels=[f"pass {t + 1}" for t in range(len(probs))])
        axes[0, 2].legend(fontsize=8, loc="upper right")
    axes[0, 2].set(title="mean exit distribution p(t)", xlabel="step", ylabel="probability", ylim=(0, 1))
    if train:
        axes[1, 0].plot(steps, [r["exit_entropy"] for r in train], label="H(mean p)")
        if "beta" in train[0]:
            twin = axes[1, 0].twinx()
            twin.plot(steps, [r["beta"] for r in train], color="gray", linestyle="--", label="beta")
            twin.set_ylabel("beta")
    axes[1, 0].set(title="exit entropy", xlabel="step", ylabel="nats")
    per_pass(axes[1, 1], train, "gate_mean", "mean gate value lambda_t", "sigmoid(gate)")
    accuracy = [r for r in evals if r.get("accuracy")]
    for key in sorted({k for r in accuracy for k in r["accuracy"]}):
        xs = [r["step"] for r in accuracy if key in r["accuracy"]]
        axes[1, 2].plot(xs, [r["accuracy"][key] for r in accuracy if key in r["accuracy"]], marker="o",
                        label=key.replace("@", " exit "))
    axes[1, 2].set(title="held-out exact match by exit depth", xlabel="step", ylabel="accuracy", ylim=(0, 1))
    if accuracy:
        axes[1, 2].legend(fontsize=7, ncol=2)
    fig.suptitle(str(Path(run_dir)))
    fig.tight_layout()
    fig.savefig(output, dpi=80)
    plt.close(fig)
    return output


@cli_main(errors=(DataError,))
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", help="a run's train.output_dir (holds metrics.jsonl)")
    p.add_argument("--output", help="PNG to write (default RUN_DIR/run.png)")
    args = p.parse_args(argv)
    print(plot_run(args.run_dir, args.output))


if __name__ == "__main__":
    main()
