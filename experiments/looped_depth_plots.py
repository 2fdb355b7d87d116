"""Tables and figures of experiments/looped_depth.py, drawn from its results JSON."""

from pathlib import Path

from experiments.ouro_plots import _plt, _save

NAMES = {"1x1": "1x1 iso-parameter", "1x3": "1x3 looped (stage I)", "1x3_last": "1x3 looped (last-pass CE)",
         "3x1": "3x1 iso-FLOP", "beta0": "1x3 looped, beta 0", "stage2": "1x3 looped + stage II gate"}


def _pt(x: float) -> str:
    return f"{100 * x:.1f}"


def _ci(ci) -> str:
    return f"[{_pt(ci[0])}, {_pt(ci[1])}]"


def report(results: dict) -> str:
    """Markdown tables (what the docs show): LR selection, test accuracy by depth, the headline
    comparisons, the exit policies and extrapolation."""
    lines = []
    sel = results.get("selection", {})
    if sel:
        lines += ["LR selection (validation accuracy at the last pass, seed 1):", "",
                  "| architecture | " + " | ".join(["LR grid: validation accuracy", "chosen LR", "inside the grid"]) + " |",
                  "|---|---|---|---|"]
        for arch, s in sel.items():
            if arch != "looped_objective":
                grid = ", ".join(f"{lr}: {_pt(v)}" for lr, v in s["lr_grid"].items())
                lines.append(f"| {NAMES.get(arch, arch)} | {grid} | {s['best_lr']:g} | {'yes' if s['bracketed'] else 'no'} |")
        if "looped_objective" in sel:
            o = sel["looped_objective"]
            lines += ["", "Looped objective on validation (mean over seeds): " +
                      ", ".join(f"{NAMES.get(k, k)} {_pt(v)}" for k, v in o["valid_accuracy"].items()) +
                      f"; chosen: {NAMES.get(o['chosen'], o['chosen'])}."]
    test = results.get("test")
    if test:
        depths = sorted(next(iter(test["archs"].values()))["by_depth"])
        lines += ["", f"Test accuracy (%) at the last pass, mean over seeds [95% interval over seeds and problems]; "
                  f"n = {test['n_test']} test problems; chance {_pt(test['chance'])}, majority answer "
                  f"{_pt(test['majority'])}:", "",
                  "| model | seeds | all depths | " + " | ".join(f"depth {d}" for d in depths) + " |",
                  "|---|---|---|" + "---|" * len(depths)]
        for key, e in test["archs"].items():
            lp = e["last_pass"]
            lines.append(f"| {NAMES.get(key, key)} | {lp['n_seeds']} | {_pt(lp['accuracy'])} {_ci(lp['ci95'])} | " +
                         " | ".join(f"{_pt(e['by_depth'][d]['mean'])} {_ci(e['by_depth'][d]['ci95'])}" for d in depths) + " |")
    summary = results.get("summary")
    if summary:
        lines += ["", "Headline comparisons on test (accuracy points, paired over seeds and problems):", ""]
        for key in ("looped_minus_iso_param", "looped_minus_iso_flop", "gate_front_minus_fixed_depth"):
            d = summary[key]
            lines.append(f"* {key}: {d['diff']:+.1f} [{d['ci95'][0]:+.1f}, {d['ci95'][1]:+.1f}] ({d['n_seeds']} seeds)")
    if test and test.get("gates"):
        lines += ["", "Exit policies on test: fixed depth vs the learned gate (q chosen on validation):", "",
                  "| model | fixed depth 1 / 2 / 3: accuracy | gate q | gate accuracy @ mean passes | "
                  "gain over the fixed-depth line [95%] | mean exit pass at depth 1 / 2 / 3 |", "|---|---|---|---|---|---|"]
        for key, g in test["gates"].items():
            at = next(f for f in g["test"] if f["q"] == g["q_chosen_on_valid"])
            fixed = " / ".join(_pt(f["accuracy"]) for f in g["fixed"])
            by = " / ".join(f"{v:.2f}" for _, v in sorted(g["exit_pass_by_depth"].items(), key=lambda kv: int(kv[0])))
            v = at["vs_fixed_line"]
            lines.append(f"| {NAMES.get(key, key)} | {fixed} | {at['q']} | {_pt(at['accuracy'])} @ {at['passes']:.2f} | "
                         f"{100 * v['diff']:+.1f} [{100 * v['ci95'][0]:+.1f}, {100 * v['ci95'][1]:+.1f}] | {by} |")
        ex = {k: e["extrapolation"] for k, e in test["archs"].items() if "extrapolation" in e}
        if ex:
            lines += ["", "Depth extrapolation (test accuracy at 1..2T passes, trained at T = 3):", ""]
            for key, rows in ex.items():
                lines.append(f"* {NAMES.get(key, key)}: " + " ".join(f"{r['num_steps']}:{_pt(r['accuracy'])}" for r in rows))
    labels = results.get("gate_labels")
    if labels:
        lines += ["", "At the answer's first token on validation, by problem depth (mean over seeds and problems): CE "
                  "per pass, the stage-II target w_t (1 = continue; t = 2..T) and the gate's exit probability "
                  "lambda_t:", "", "| model | depth | CE per pass | stage-II target w_2..w_T | gate lambda_1..lambda_T |",
                  "|---|---|---|---|---|"]
        for key, by_depth in labels.items():
            for d, r in sorted(by_depth.items(), key=lambda kv: int(kv[0])):
                lines.append(f"| {NAMES.get(key, key)} | {d} | " + " / ".join(f"{x:.2f}" for x in r["ce"]) + " | " +
                             " / ".join(f"{x:.2f}" for x in r["w"]) + " | " +
                             " / ".join(f"{x:.2f}" for x in r["lambda"]) + " |")
    return "\n".join(lines)


def _baselines(ax, test):
    ax.axhline(test["chance"], color="gray", ls=":", lw=1, label="chance")
    ax.axhline(test["majority"], color="gray", ls="--", lw=1, label="majority answer")


def _err(ci, mean):
    return [[mean - ci[0]], [ci[1] - mean]]


def plot_all(results: dict, out_dir: Path, tag: str) -> None:
    """One PNG per finding: accuracy by depth, training curves, LR grid, exit fronts, extrapolation."""
    test = results.get("test")
    if not test:
        return
    plt = _plt()
    runs = results["runs"]

    fig, (depth_ax, curve_ax) = plt.subplots(1, 2, figsize=(12, 4.5))
    keys = [k for k in ("1x1", "1x3", "1x3_last", "3x1") if k in test["archs"]]
    depths = sorted(next(iter(test["archs"].values()))["by_depth"], key=int)
    for i, key in enumerate(keys):
        e = test["archs"][key]
        for j, d in enumerate(depths):
            m = e["by_depth"][d]
            x = j + (i - (len(keys) - 1) / 2) * 0.2
            depth_ax.bar(x, m["mean"], width=0.18, color=f"C{i}", label=NAMES[key] if j == 0 else None,
                         yerr=_err(m["ci95"], m["mean"]), capsize=3)
    depth_ax.set_xticks(range(len(depths)), [f"depth {d}" for d in depths])
    _baselines(depth_ax, test)
    depth_ax.set(ylim=(0, 1), ylabel="test exact match", title="test accuracy by depth (95% CI, seeds x problems)")
    depth_ax.legend(fontsize=7)
    for i, key in enumerate(keys):
        for name, r in runs.items():
            if r["arch"] == key and not r["variant"] and r["lr"] == results["selection"].get(key, results["selection"]["1x3"])["best_lr"]:
                c = r["curves"]
                curve_ax.plot(c["eval_step"], [a[f"chains@{r['loops']}"] for a in c["eval_accuracy"]], color=f"C{i}",
                              alpha=0.8, label=NAMES[key] if r["seed"] == 1 else None)
    _baselines(curve_ax, test)
    curve_ax.set(ylim=(0, 1), xlabel="training step", ylabel="validation exact match (last pass)",
                 title="validation curves at the chosen LR (one line per seed)")
    curve_ax.legend(fontsize=7)
    _save(fig, out_dir / f"{tag}_depth.png")

    fig, (front_ax, exit_ax, ex_ax) = plt.subplots(1, 3, figsize=(16, 4.5))
    for i, (key, g) in enumerate(test["gates"].items()):
        fixed = g["fixed"]
        front_ax.errorbar([f["depth"] for f in fixed], [f["accuracy"] for f in fixed], color=f"C{i}", ls="--", marker="s",
                          yerr=[[f["accuracy"] - f["ci95"][0] for f in fixed], [f["ci95"][1] - f["accuracy"] for f in fixed]],
                          capsize=2, label=f"{NAMES[key]}: fixed depth")
        front_ax.errorbar([f["passes"] for f in g["test"]], [f["accuracy"] for f in g["test"]], color=f"C{i}", marker="o",
                          ms=3, yerr=[[f["accuracy"] - f["ci95"][0] for f in g["test"]],
                                      [f["ci95"][1] - f["accuracy"] for f in g["test"]]], capsize=2,
                          label=f"{NAMES[key]}: gate, q sweep")
        by = sorted(g["exit_pass_by_depth"].items(), key=lambda kv: int(kv[0]))
        exit_ax.plot([int(d) for d, _ in by], [v for _, v in by], marker="o", color=f"C{i}",
                     label=f"{NAMES[key]} (q = {g['q_chosen_on_valid']})")
    _baselines(front_ax, test)
    front_ax.set(ylim=(0, 1), xlabel="mean passes on the answer token", ylabel="test exact match",
                 title="accuracy vs compute: gate vs fixed depth")
    front_ax.legend(fontsize=6)
    exit_ax.set(xlabel="problem depth (1: training facts)", ylabel="mean exit pass", ylim=(1, results["T"]),
                title="the gate's exit pass by problem depth")
    exit_ax.legend(fontsize=7)
    for i, (key, e) in enumerate(test["archs"].items()):
        if "extrapolation" in e:
            rows = e["extrapolation"]
            ex_ax.errorbar([r["num_steps"] for r in rows], [r["accuracy"] for r in rows], marker="o", color=f"C{i}",
                           yerr=[[r["accuracy"] - r["ci95"][0] for r in rows], [r["ci95"][1] - r["accuracy"] for r in rows]],
                           capsize=2, label=NAMES[key])
    ex_ax.axvline(results["T"], color="k", lw=0.5)
    _baselines(ex_ax, test)
    ex_ax.set(ylim=(0, 1), xlabel="passes at inference", ylabel="test exact match", title="depth extrapolation (trained at T)")
    ex_ax.legend(fontsize=7)
    _save(fig, out_dir / f"{tag}_exits.png")

    fig, (lr_ax, ent_ax) = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, (arch, s) in enumerate((k, v) for k, v in results["selection"].items() if k != "looped_objective"):
        grid = sorted((float(lr), v) for lr, v in s["lr_grid"].items())
        lr_ax.plot([g[0] for g in grid], [g[1] for g in grid], marker="o", color=f"C{i}", label=NAMES[arch])
    lr_ax.set(xscale="log", ylim=(0, 1), xlabel="peak LR", ylabel="validation exact match (seed 1)",
              title="LR grid per architecture")
    _baselines(lr_ax, test)
    lr_ax.legend(fontsize=7)
    for name, r in runs.items():
        if r["loops"] > 1 and r["objective"] == "stage1" and r["variant"] in ("", "beta0") and \
                r["lr"] == results["selection"]["1x3"]["best_lr"]:
            c = r["curves"]
            ent_ax.plot(c["step"], c["exit_entropy"], color="C0" if r["variant"] == "" else "C3",
                        label=("paper beta" if r["variant"] == "" else "beta 0") if r["seed"] == 1 else None)
    ent_ax.set(xlabel="training step", ylabel="exit entropy (nats)", ylim=(0, 1.2),
               title="exit entropy during training (ln 3 = 1.10 is uniform)")
    ent_ax.legend(fontsize=7)
    _save(fig, out_dir / f"{tag}_training.png")
