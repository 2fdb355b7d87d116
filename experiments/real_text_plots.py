"""Figures of experiments/real_text.py, drawn from its results JSON: test loss per pass and the
validation curves, the exit gate's perplexity-vs-compute front and depth extrapolation, the LR
grids and the looped objective's diagnosis. The trivial baseline in each loss plot is the training
split's unigram entropy (the best context-free model); uniform guessing, ln(vocabulary), is far above."""

import math
from pathlib import Path

from experiments.ouro_plots import _plt, _save
from experiments.real_text import final_runs


def _unigram(ax, test, ppl=False, zoomed=False):
    """The unigram baseline as a line; on an axis `zoomed` below it, as a note at the top."""
    h = math.exp(test["unigram_entropy"]) if ppl else test["unigram_entropy"]
    if not zoomed or h <= ax.get_ylim()[1]:
        ax.axhline(h, color="gray", ls=":", lw=1, label="unigram (context-free) baseline")
    else:
        ax.annotate(f"unigram (context-free) baseline: {h:.3g}{'' if ppl else ' nats'}, above the chart",
                    xy=(0.02, 0.97), xycoords="axes fraction", va="top", fontsize=7, color="gray")


def plot_all(results: dict, out_dir: Path, tag: str) -> None:
    test = results.get("test")
    if not test:
        return
    plt = _plt()
    archs = [a for a, s in results["selection"].items() if "lr_grid" in s]  # the LR-selected architectures

    fig, (pass_ax, curve_ax) = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, (key, e) in enumerate(test["archs"].items()):
        n_seeds = len(e["per_seed_last"])
        if len(e["per_pass"]) == 1:  # a one-pass model: its loss as a level across the passes, its interval a band
            pass_ax.axhline(e["per_pass"][0], color=f"C{i}", label=f"{key} ({n_seeds} seed{'s' if n_seeds > 1 else ''})")
            pass_ax.axhspan(*e["per_pass_ci95"][0], color=f"C{i}", alpha=0.15)
            continue
        xs = range(1, len(e["per_pass"]) + 1)
        pass_ax.errorbar(list(xs), e["per_pass"], marker="o", color=f"C{i}", capsize=3,
                         yerr=[[m - c[0] for m, c in zip(e["per_pass"], e["per_pass_ci95"])],
                               [c[1] - m for m, c in zip(e["per_pass"], e["per_pass_ci95"])]],
                         label=f"{key} ({n_seeds} seed{'s' if n_seeds > 1 else ''})")
    low = min(c[0] for e in test["archs"].values() for c in e["per_pass_ci95"])
    high = max(c[1] for e in test["archs"].values() for c in e["per_pass_ci95"])
    pass_ax.set(ylim=(low - 0.03, min(high + 0.05, test["unigram_entropy"] + 0.3)))  # zoomed on the models
    _unigram(pass_ax, test, zoomed=True)
    pass_ax.set(xlabel="pass", ylabel="test CE (nats/token)", xticks=range(1, results["T"] + 1),
                title="test loss per pass (95% CI over seeds and windows)")
    pass_ax.legend(fontsize=7)
    for i, arch in enumerate(archs):
        for r in final_runs(results, arch):
            c = r["curves"]
            curve_ax.plot(c["valid_step"], [v[-1] for v in c["valid_loss_per_pass"]], color=f"C{i}", alpha=0.8,
                          label=f"{arch} (LR {r['lr']:g})" if r["seed"] == 1 else None)
    _unigram(curve_ax, test)
    curve_ax.set(xlabel="training step", ylabel="validation CE, last pass", ylim=(None, test["unigram_entropy"] + 0.5),
                 title="validation curves at the chosen LR (one line per seed)")
    curve_ax.legend(fontsize=7)
    _save(fig, out_dir / f"{tag}_loss.png")

    fig, (front_ax, ex_ax) = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, (key, e) in enumerate(test["archs"].items()):
        if "gate" not in e:
            continue
        g = e["gate"]
        front_ax.plot(range(1, len(g["test_fixed_ppl"]) + 1), g["test_fixed_ppl"], ls="--", marker="s", color=f"C{i}",
                      label=f"{key}: fixed depth")
        front_ax.plot([f["passes"] for f in g["test"]], [f["ppl"] for f in g["test"]], marker="o", ms=3, color=f"C{i}",
                      label=f"{key}: gate, q sweep (q on validation: {g['q_within_2pct_on_valid']})")
        front_ax.axhline(1.02 * g["test_fixed_ppl"][-1], color=f"C{i}", lw=0.6, ls=":")
        ex_ax.plot([r["num_steps"] for r in e["extrapolation"]], [r["loss"] for r in e["extrapolation"]], marker="o",
                   color=f"C{i}", label=key)
    for i, (key, e) in enumerate(test["archs"].items()):
        if "gate" not in e and len(e["per_pass"]) == 1:
            front_ax.axhline(math.exp(e["per_pass"][-1]), color=f"C{i}", lw=1, label=f"{key}")
    front_ax.set(xlabel="mean passes per token", ylabel="test perplexity",
                 title="exit gate vs fixed depth (dotted: 2% above full depth)")
    front_ax.legend(fontsize=6)
    ex_ax.axvline(results["T"], color="k", lw=0.5)
    _unigram(ex_ax, test)
    ex_ax.set(xlabel="passes at inference", ylabel="test CE (nats/token)", title=f"depth extrapolation (trained at T = {results['T']})")
    ex_ax.legend(fontsize=7)
    _save(fig, out_dir / f"{tag}_exits.png")

    fig, (lr_ax, obj_ax) = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, arch in enumerate(archs):
        grid = sorted((float(lr), v) for lr, v in results["selection"][arch]["lr_grid"].items())
        lr_ax.plot([g[0] for g in grid], [g[1] for g in grid], marker="o", color=f"C{i}", label=arch)
    _unigram(lr_ax, test)
    lr_ax.set(xscale="log", xlabel="peak LR", ylabel="validation CE, last pass (seed 1)", title="LR grid per architecture")
    lr_ax.legend(fontsize=7)
    obj = results["selection"]["looped_objective"]
    for i, (o, losses) in enumerate(obj["valid_loss_per_pass"].items()):
        probs = " ".join(f"{p:.2f}" for p in obj["final_exit_probs"][o])
        obj_ax.plot(range(1, len(losses) + 1), losses, marker="o", color=f"C{i + 3}",
                    label=f"{o} (final exit distribution {probs})")
    obj_ax.set(xlabel="pass", ylabel="validation CE", xticks=range(1, results["T"] + 1),
               title=f"looped objective at LR {obj['lr']:g}, seed 1 (chosen: {obj['chosen']})")
    obj_ax.legend(fontsize=7)
    _save(fig, out_dir / f"{tag}_training.png")

    length = results["selection"].get("length")
    if length:  # the training-length choice: seed 1 of each model at both lengths, on validation
        fig, ax = plt.subplots(figsize=(6.5, 4.5))
        for i, arch in enumerate(archs):
            for (steps, entry), style in zip(sorted(length["valid"][arch].items(), key=lambda kv: int(kv[0])), ("-", "--")):
                c = results["runs"][entry["run"]]["curves"]
                ax.plot(c["valid_step"], [v[-1] for v in c["valid_loss_per_pass"]], ls=style, color=f"C{i}",
                        label=f"{arch}, {steps} steps")
        _unigram(ax, test)
        ax.set(xlabel="training step", ylabel="validation CE, last pass (seed 1)",
               ylim=(None, test["unigram_entropy"] + 0.5),
               title=f"training length on validation (chosen: {length['chosen_steps']} steps)")
        ax.legend(fontsize=7)
        _save(fig, out_dir / f"{tag}_length.png")
