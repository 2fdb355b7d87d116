"""The figures of experiments/ouro_synthetic.py, drawn from its results JSON (one PNG per suite)."""

from collections import defaultdict
from pathlib import Path


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out: Path):
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(out, dpi=80)
    plt.close(fig)


def mano_summary(runs: dict) -> dict:
    """{arch: {lr: [final accuracy per seed]}} and the best LR per arch by mean accuracy."""
    table = defaultdict(lambda: defaultdict(list))
    for entry in runs.values():
        table[entry["arch"]][entry["lr"]].append(entry["final"]["accuracy"])
    best = {a: max(lrs, key=lambda lr: sum(lrs[lr]) / len(lrs[lr])) for a, lrs in table.items()}
    return {"by_lr": {a: dict(lrs) for a, lrs in table.items()}, "best_lr": best}


def plot_mano(runs: dict, out: Path):
    plt = _plt()
    summary = mano_summary(runs)
    fig, (curve, bars) = plt.subplots(1, 2, figsize=(12, 4.5))
    for entry in runs.values():
        if entry["lr"] != summary["best_lr"][entry["arch"]]:
            continue
        c = entry["curves"]
        key = next((k for k in (c["eval_accuracy"][0] if c["eval_accuracy"] else {})
                    if k == f"mano@{entry['loops']}"), None)
        if key:
            curve.plot(c["eval_tokens"], [a[key] for a in c["eval_accuracy"]], marker="o",
                       label=f"{entry['arch']} seed {entry['seed']} (lr {entry['lr']:g})")
    curve.set(title="Mano held-out exact match at l = L (best LR)", xlabel="training tokens", ylabel="accuracy")
    curve.legend(fontsize=7)
    archs = sorted(summary["by_lr"], key=lambda a: (int(a.split("x")[0]) * int(a.split("x")[1]), a))
    for i, a in enumerate(archs):
        lrs = sorted(summary["by_lr"][a].items())
        for j, (lr, accs) in enumerate(lrs):
            x = i + (j - (len(lrs) - 1) / 2) * 0.25
            bars.bar(x, sum(accs) / len(accs), width=0.22, color=f"C{j}", label=f"lr {lr:g}" if i == 0 else None)
            bars.scatter([x] * len(accs), accs, color="k", s=10, zorder=3)
    bars.set_xticks(range(len(archs)), archs)
    bars.set(title="final accuracy by architecture (layers x loops), dots = seeds", ylabel="accuracy")
    bars.legend(fontsize=8)
    _save(fig, out)


def plot_multihop(runs: dict, out: Path):
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for entry in sorted(runs.values(), key=lambda e: (e["loops"], e["seed"])):
        c = entry["curves"]
        ax.plot(c["eval_tokens"], [a.get(f"multihop@{entry['loops']}") for a in c["eval_accuracy"]], marker="o",
                color=f"C{[1, 2, 4].index(entry['loops'])}", label=f"{entry['loops']} loop(s), seed {entry['seed']}")
    ax.set(title="held-out 2-hop questions: accuracy vs training tokens", xlabel="training tokens", ylabel="accuracy")
    ax.legend(fontsize=8)
    _save(fig, out)


def _front(ax, front, label, color):
    ax.plot([r["passes"] for r in front], [r["accuracy"] for r in front], marker="o", color=color, label=label)


def plot_entropy(runs: dict, out: Path):
    plt = _plt()
    fig, (ent, depth, front) = plt.subplots(1, 3, figsize=(15, 4.5))
    for i, (name, entry) in enumerate(sorted(runs.items())):
        c = entry["curves"]
        ent.plot(c["step"], c["exit_entropy"], color=f"C{i}", label=name)
        depth.plot(c["step"], c["mean_depth"], color=f"C{i}", label=name)
        _front(front, entry["front"]["gate"], f"{name}: gate, q sweep", f"C{i}")
        front.plot([r["passes"] for r in entry["front"]["fixed"]], [r["accuracy"] for r in entry["front"]["fixed"]],
                   linestyle=":", marker="s", color=f"C{i}", label=f"{name}: fixed depth")
    ent.set(title="entropy of the mean exit distribution", xlabel="step", ylabel="nats")
    depth.set(title="mean exit depth E[t]", xlabel="step", ylabel="passes")
    front.set(title="accuracy vs mean passes (end of training)", xlabel="mean passes", ylabel="accuracy")
    for ax in (ent, depth, front):
        ax.legend(fontsize=7)
    _save(fig, out)


def plot_stage2(entry: dict, out: Path):
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    _front(ax, entry["stage1_gate"], "stage-I gate, q sweep", "C0")
    _front(ax, entry["front"]["gate"], "stage-II gate, q sweep", "C1")
    _front(ax, entry["hidden_diff"], "hidden-state difference, eps sweep", "C2")
    _front(ax, entry["front"]["fixed"], "fixed depth", "C3")
    ax.set(title="exit policies: accuracy vs mean passes", xlabel="mean passes", ylabel="accuracy")
    ax.legend(fontsize=8)
    _save(fig, out)


def plot_extrapolation(result: dict, out: Path):
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4.5))
    rows = result["by_steps"]
    ax.plot([r["num_steps"] for r in rows], [r["accuracy"] for r in rows], marker="o")
    ax.axvline(result["trained_steps"], color="gray", linestyle="--", label="trained T")
    ax.set(title="depth extrapolation", xlabel="passes run at inference", ylabel="held-out accuracy")
    ax.legend()
    _save(fig, out)


def plot_all(results: dict, folder: Path, tag: str) -> list[Path]:
    """One PNG per suite that has results; returns the paths written."""
    written = []
    drawers = {"mano": plot_mano, "multihop": plot_multihop, "entropy": plot_entropy}
    for suite, draw in drawers.items():
        if results.get(suite):
            written.append(folder / f"{tag}_{suite}.png")
            draw(results[suite], written[-1])
    if results.get("stage2", {}).get("stage2"):
        written.append(folder / f"{tag}_stage2.png")
        plot_stage2(results["stage2"]["stage2"], written[-1])
    if results.get("extrapolation", {}).get("by_steps"):
        written.append(folder / f"{tag}_extrapolation.png")
        plot_extrapolation(results["extrapolation"], written[-1])
    return written
