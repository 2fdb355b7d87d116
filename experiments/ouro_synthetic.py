"""Reproduce the Ouro paper's small-scale findings through the real pipeline (spec/ouro.md 2-3, 5.3, 6).

    python -m experiments.ouro_synthetic --suite mano|multihop|entropy|stage2|extrapolation|all [--quick]

Every run is the real training command, `bash launch/pretrain.sh configs/experiments/ouro_<task>.yaml
OVERRIDES` (data pipeline, DeepSpeed, checkpoints), followed by `python -m pretrain.export`; the
driver then scores the exported model on the held-out problems. Suites and the paper's direction:

* mano: k x 1 (iso-parameter), k x T (looped), kT x 1 (iso-FLOP) on Mano at difficulty L, an LR
  grid and seeds; held-out exact match at l = L. Looped > iso-parameter, close to iso-FLOP (6.2).
* multihop: loops {1, 2, 4} on held-out 2-hop questions, accuracy against training tokens.
  More loops learn from fewer samples (6.3).
* entropy: beta = 0 against the paper's schedule (0.1, then 0.05): exit entropy and mean depth over
  training, accuracy against mean passes at the end. Without it the gate collapses (3.3, App. A).
* stage2: from the entropy suite's stage-I model, train the gate alone, then sweep the exit
  threshold: stage-II gate vs stage-I gate vs hidden-state difference vs fixed depth (3.4).
* extrapolation: the T-pass model of the entropy suite evaluated at 1..2T passes (5.3).

Results: experiments/results/ouro_synthetic[_quick].json (written after every run; a restarted
suite skips the runs it already holds) and PNGs beside it. Evaluation problems are generated
apart from training and filtered out of it (pretrain/data/synthetic.py; tested).
"""

import argparse
import json
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "experiments" / "results"
SUITES = ("mano", "multihop", "entropy", "stage2", "extrapolation")


@dataclass(frozen=True)
class Scale:
    """What --quick shrinks; the tables are the same."""
    steps: int
    lrs: tuple
    seeds: tuple
    mano_train: int
    qa_steps: int
    stage2_steps: int


FULL = Scale(steps=500, lrs=(1e-4, 3e-4, 1e-3), seeds=(1, 2), mano_train=12000, qa_steps=600, stage2_steps=150)
QUICK = Scale(steps=150, lrs=(3e-4,), seeds=(1,), mano_train=12000, qa_steps=200, stage2_steps=50)

# Mano difficulty: operators l ~ U{1..L}, evaluation at l = L; the modulus sets how many table entries
# the model must learn (the paper's F_23 needs far more steps than a CPU budget; see the README). At
# L = 2 over F_7 there are 6,174 distinct l = L problems: 12,000 training problems (half at l = L) leave
# about 40% of them unseen, and the held-out set is drawn from those (1,000 drawn, the seen ones dropped).
MANO = {"max_ops": 2, "modulus": 7, "mano_eval": 1000}
MULTIHOP = {"per_layer": 24, "relations": 5, "qa_train_fraction": 0.5, "fact_repeats": 20, "qa_repeats": 6}
K, LOOPS = 2, 3  # the Mano architectures: K x 1, K x LOOPS, (K * LOOPS) x 1
ENTROPY_T = 4  # passes of the entropy / stage-II / extrapolation model
PAPER_BETA = "[[0, 0.1], [{half}, 0.05]]"


@dataclass
class Run:
    suite: str
    name: str
    config: str
    overrides: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)  # what the run varies, for the tables

    def override_list(self) -> list[str]:
        return [f"{k}={v}" for k, v in self.overrides.items()]


def arch(layers: int, loops: int) -> dict:
    return {"model.overrides.num_hidden_layers": layers, "model.overrides.total_ut_steps": loops}


def plan(suite: str, scale: Scale, root: Path, data: dict) -> list[Run]:
    """The runs of a suite. Runs of one comparison differ only in what it varies (tested)."""
    mano = {"data.blend": str(data["mano"] / "train"), "data.tokenizer": str(data["mano"] / "tokenizer.model"),
            "data.eval_tasks_dir": str(data["mano"]), "train.max_steps": scale.steps}
    runs = []
    if suite == "mano":
        for name, (layers, loops) in {f"{K}x1": (K, 1), f"{K}x{LOOPS}": (K, LOOPS),
                                      f"{K * LOOPS}x1": (K * LOOPS, 1)}.items():
            for lr in scale.lrs:
                for seed in scale.seeds:
                    runs.append(Run(suite, f"{name}_lr{lr:g}_s{seed}", "configs/experiments/ouro_mano.yaml",
                                    {**mano, **arch(layers, loops), "optim.lr": lr, "train.seed": seed},
                                    {"arch": name, "layers": layers, "loops": loops, "lr": lr, "seed": seed}))
    elif suite == "multihop":
        qa = {"data.blend": str(data["multihop"] / "train"), "data.tokenizer": str(data["multihop"] / "tokenizer.model"),
              "data.eval_tasks_dir": str(data["multihop"]), "train.max_steps": scale.qa_steps,
              "train.eval_every": max(scale.qa_steps // 6, 1)}
        for loops in (1, 2, 4):
            for seed in scale.seeds:
                runs.append(Run(suite, f"loops{loops}_s{seed}", "configs/experiments/ouro_multihop.yaml",
                                {**qa, "model.overrides.total_ut_steps": loops, "train.seed": seed},
                                {"loops": loops, "seed": seed}))
    elif suite == "entropy":
        for name, schedule in (("beta0", "[[0, 0.0]]"), ("paper_beta", PAPER_BETA.format(half=scale.steps // 2))):
            runs.append(Run(suite, name, "configs/experiments/ouro_mano.yaml",
                            {**mano, **arch(K, ENTROPY_T), "ouro.beta_schedule": schedule, "train.seed": 1},
                            {"beta_schedule": schedule}))
    elif suite == "stage2":
        base = root / "entropy" / "paper_beta" / "hf"
        runs.append(Run(suite, "stage2", "configs/experiments/ouro_mano.yaml",
                        {**mano, **arch(K, ENTROPY_T), "model.init_from": str(base), "ouro.objective": "stage2",
                         "train.max_steps": scale.stage2_steps, "optim.warmup_steps": 5, "train.seed": 1},
                        {"init_from": "entropy/paper_beta"}))
    for run in runs:
        run.overrides["train.output_dir"] = str(root / run.suite / run.name)
    return runs


def prepare_data(root: Path, scale: Scale) -> dict:
    """The two task corpora (tokenizer, indexed files, held-out eval_<task>.jsonl), made once."""
    from pretrain.data.synthetic import prepare_default_corpus

    return {"mano": prepare_default_corpus(root / "data" / "mano", seed=7, mano_train=scale.mano_train,
                                           fact_repeats=0, qa_repeats=0, **MANO)["data"].parent,
            "multihop": prepare_default_corpus(root / "data" / "multihop", seed=7, mano_train=0,
                                               **MULTIHOP)["data"].parent}


def save_json(path: Path, obj) -> None:
    """Write a results file atomically (a killed driver never leaves half a file), with the paths inside
    this repository relative to it: a results file names no machine's folders (tested)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1).replace(json.dumps(f"{REPO}/")[1:-1], ""))
    tmp.replace(path)


def bracketed_lr(score, lrs, max_extensions: int, lower_is_better: bool = False) -> dict:
    """Grid search of a peak LR (`score(lr)`: a validation number of a trained run), the grid extended
    by a halving or doubling while its best LR is at an edge, at most `max_extensions` times.
    Returns {"lr_grid": {lr: score}, "best_lr", "bracketed"}."""
    lrs = sorted(lrs)
    pick = min if lower_is_better else max
    for extension in range(max_extensions + 1):
        scores = {lr: score(lr) for lr in lrs}
        best = pick(lrs, key=lambda lr: scores[lr])
        if len(lrs) == 1 or extension == max_extensions or best not in (lrs[0], lrs[-1]):
            break
        lrs = sorted(lrs + [best / 2 if best == lrs[0] else best * 2])
    return {"lr_grid": {f"{lr:g}": scores[lr] for lr in lrs}, "best_lr": best,
            "bracketed": best not in (lrs[0], lrs[-1])}


def train_and_export(run: Run) -> Path:
    """The real commands; returns the exported folder (kept, so an interrupted suite reuses it)."""
    out = Path(run.overrides["train.output_dir"])
    folder = out / "hf"
    if (folder / "config.json").exists():
        return folder
    log = out.parent / f"{run.name}.log"
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        for cmd in (["bash", "launch/pretrain.sh", run.config, *run.override_list()],
                    [sys.executable, "-m", "pretrain.export", "--checkpoint", str(out), "--output", str(folder)]):
            f.write("$ " + " ".join(cmd) + "\n")
            f.flush()
            if subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT).returncode:
                raise SystemExit(f"error: run {run.suite}/{run.name} failed; see {log}")
    return folder


def load(folder: Path):
    from looplm import LoopLMForCausalLM
    from pretrain.data import Tokenizer

    return LoopLMForCausalLM.from_pretrained(folder).eval(), Tokenizer(folder / "tokenizer.model")


@torch.no_grad()
def score_problems(model, tok, items, batch: int = 500, **policy) -> dict:
    """Per-problem greedy exact match under an exit policy (`pretrain.validation.greedy_answers`, the
    trainer's scorer: 4 new tokens, first word; here without the KV cache, so that under a threshold
    policy later tokens do not depend on how skipped passes fill it) and the pass at which the first answer token was produced (its exit
    pass at the prompt's last position: the compute an early-exiting decoder spends on it).
    Returns {"correct": [0/1], "passes": [int]}, one entry per problem."""
    from looplm import left_pad
    from pretrain.validation import greedy_answers

    correct, passes = [], []
    for i in range(0, len(items), batch):
        chunk = items[i:i + batch]
        prompts = [p for p, _ in chunk]
        answers = greedy_answers(model, tok, prompts, "cpu", use_cache=False, **policy)
        correct += [int(g == a) for g, (_, a) in zip(answers, chunk)]
        ids, mask = left_pad([tok.encode(p) for p in prompts])
        out = model(ids, attention_mask=mask, use_cache=False, **policy)
        passes += (out.exit_steps[:, -1] + 1).tolist()
    return {"correct": correct, "passes": passes}


def score(model, tok, items, batch: int = 500, **policy) -> dict:
    """Held-out accuracy and mean exit pass of `score_problems` over the items."""
    got = score_problems(model, tok, items, batch, **policy)
    n = len(got["correct"])
    return {"accuracy": sum(got["correct"]) / max(n, 1), "passes": sum(got["passes"]) / max(n, 1), "n": n}


def eval_items(run: Run) -> list:
    from pretrain.data.synthetic import read_eval

    task_dir = Path(run.overrides["data.eval_tasks_dir"])
    return read_eval(next(task_dir.glob("eval_*.jsonl")))


def curves(run: Run) -> dict:
    """Per-step records of the run's metrics.jsonl: training CE per pass, exit entropy, mean depth,
    and at every evaluation the trainer's held-out accuracy by depth and validation CE per pass."""
    records = [json.loads(line) for line in (Path(run.overrides["train.output_dir"]) / "metrics.jsonl").open()]
    train = [r for r in records if "loss_per_pass" in r and not r.get("skipped")]
    evals = [r for r in records if "accuracy" in r]
    valid = [r for r in records if "valid_loss_per_pass" in r]
    return {"step": [r["step"] for r in train], "tokens": [r["tokens_seen"] for r in train],
            "loss_per_pass": [r["loss_per_pass"] for r in train], "exit_entropy": [r["exit_entropy"] for r in train],
            "mean_depth": [sum((t + 1) * p for t, p in enumerate(r["exit_probs"])) for r in train],
            "eval_step": [r["step"] for r in evals], "eval_tokens": [_tokens_at(train, r["step"]) for r in evals],
            "eval_accuracy": [r["accuracy"] for r in evals],
            "valid_step": [r["step"] for r in valid], "valid_loss_per_pass": [r["valid_loss_per_pass"] for r in valid]}


def thin(c: dict, points: int = 250) -> dict:
    """The per-step training records of `curves` as at most `points` windows: each window's last step
    and token count, and its mean CE per pass, exit entropy and mean depth (a small results file whose
    curves still show the trend). Idempotent; the evaluation records are kept whole."""
    n = len(c["step"])
    if n <= points:
        return c
    ends = [round(n * (i + 1) / points) for i in range(points)]
    windows = [range(a, b) for a, b in zip([0] + ends[:-1], ends)]

    def mean(rows):
        return sum(rows) / len(rows)

    return {**c, "step": [c["step"][w[-1]] for w in windows], "tokens": [c["tokens"][w[-1]] for w in windows],
            "loss_per_pass": [[mean([c["loss_per_pass"][i][t] for i in w]) for t in range(len(c["loss_per_pass"][0]))]
                              for w in windows],
            "exit_entropy": [mean([c["exit_entropy"][i] for i in w]) for w in windows],
            "mean_depth": [mean([c["mean_depth"][i] for i in w]) for w in windows]}


def _tokens_at(train, step):
    return next((r["tokens_seen"] for r in train if r["step"] == step), None)


def describe(model, run: Run) -> dict:
    from pretrain.config import load_config
    from pretrain.metrics import flops_per_token

    seq_len = load_config(REPO / run.config, run.override_list()).data.seq_len

    return {"parameters": sum(p.numel() for p in model.parameters()),
            "train_flops_per_token": flops_per_token(model.config, seq_len)}


def threshold_front(model, tok, items, T: int) -> dict:
    qs = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
    return {"fixed": [score(model, tok, items, exit_at_step=t) | {"depth": t + 1} for t in range(T)],
            "gate": [score(model, tok, items, exit_threshold=q) | {"q": q} for q in qs]}


def run_suite(suite: str, scale: Scale, root: Path, data: dict, results: dict, save) -> None:
    done = results.setdefault(suite, {})
    if suite == "extrapolation":
        if "paper_beta" not in results.get("entropy", {}):
            run_suite("entropy", scale, root, data, results, save)
        model, tok = load(root / "entropy" / "paper_beta" / "hf")
        items = eval_items(plan("entropy", scale, root, data)[1])
        done["model"] = "entropy/paper_beta"
        done["trained_steps"] = model.config.total_ut_steps
        done["by_steps"] = [score(model, tok, items, num_steps=n, exit_at_step=n - 1) | {"num_steps": n}
                            for n in range(1, 2 * model.config.total_ut_steps + 1)]
        save()
        print(f"[extrapolation] T=1..{2 * model.config.total_ut_steps}: " +
              " ".join(f"{r['accuracy']:.2f}" for r in done["by_steps"]), flush=True)
        return
    if suite == "stage2" and "paper_beta" not in results.get("entropy", {}):
        run_suite("entropy", scale, root, data, results, save)
    runs = plan(suite, scale, root, data)
    for i, run in enumerate(runs, 1):
        if run.name in done:
            print(f"[{suite} {i}/{len(runs)}] {run.name}: done earlier", flush=True)
            continue
        start = time.time()
        folder = train_and_export(run)
        model, tok = load(folder)
        items = eval_items(run)
        T = model.config.total_ut_steps
        entry = {**run.meta, **describe(model, run), "overrides": run.overrides, "curves": curves(run),
                 "final": score(model, tok, items, exit_at_step=T - 1), "n_eval": len(items)}
        entry["tokens_trained"] = entry["curves"]["tokens"][-1]
        if suite in ("entropy", "stage2"):
            entry["front"] = threshold_front(model, tok, items, T)
        if suite == "stage2":
            base, _ = load(root / "entropy" / "paper_beta" / "hf")
            entry["stage1_gate"] = threshold_front(base, tok, items, T)["gate"]
            entry["hidden_diff"] = [score(model, tok, items, exit_hidden_diff=e) | {"epsilon": e}
                                    for e in (0.5, 1.0, 2.0, 4.0, 8.0, 16.0)]
        entry["seconds"] = round(time.time() - start, 1)
        done[run.name] = entry
        save()
        print(f"[{suite} {i}/{len(runs)}] {run.name}: accuracy {entry['final']['accuracy']:.3f} at depth {T} "
              f"({entry['seconds']:.0f} s)", flush=True)


def report(results: dict) -> str:
    """Markdown tables of a results file (what the README shows)."""
    lines = []
    mano = results.get("mano", {})
    if mano:
        lines += ["| Mano configuration | parameters | train FLOPs/token | " +
                  " | ".join(f"LR {lr:g}" for lr in sorted({r['lr'] for r in mano.values()})) + " |",
                  "|---|---|---|" + "---|" * len({r['lr'] for r in mano.values()})]
        for arch in dict.fromkeys(r["arch"] for r in mano.values()):
            runs = [r for r in mano.values() if r["arch"] == arch]
            cells = []
            for lr in sorted({r["lr"] for r in mano.values()}):
                accs = [r["final"]["accuracy"] for r in runs if r["lr"] == lr]
                cells.append(" / ".join(f"{a:.3f}" for a in accs) if accs else "not run")
            lines.append(f"| {arch} | {runs[0]['parameters']:,} | {runs[0]['train_flops_per_token'] / 1e6:.2f}M | "
                         + " | ".join(cells) + " |")
        lines.append("")
    for suite in ("multihop", "entropy", "stage2"):
        for name, r in results.get(suite, {}).items():
            c = r["curves"]
            lines.append(f"* {suite} {name}: held-out accuracy at the last pass {r['final']['accuracy']:.3f} "
                         f"(n={r['n_eval']}); trainer evaluations " +
                         " ".join(f"{t / 1e3:.0f}k:{max(a.values()):.2f}" for t, a in
                                  zip(c["eval_tokens"], c["eval_accuracy"]) if t) +
                         f"; exit entropy {c['exit_entropy'][0]:.2f} -> {c['exit_entropy'][-1]:.2f}, "
                         f"mean depth {c['mean_depth'][0]:.2f} -> {c['mean_depth'][-1]:.2f}")
            if "front" in r:
                lines.append("  fixed depth: " + " ".join(f"{x['depth']}:{x['accuracy']:.2f}" for x in r["front"]["fixed"])
                             + "; gate (q: accuracy @ passes): " + " ".join(
                                 f"{x['q']}:{x['accuracy']:.2f}@{x['passes']:.2f}" for x in r["front"]["gate"][::3]))
    ex = results.get("extrapolation", {})
    if ex.get("by_steps"):
        lines.append("* extrapolation (trained at T=4), accuracy at T=1..8: " +
                     " ".join(f"{x['accuracy']:.2f}" for x in ex["by_steps"]))
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", choices=SUITES + ("all",), default="all")
    p.add_argument("--quick", action="store_true", help="reduced size (about 15 minutes for all suites)")
    p.add_argument("--root", type=Path, help="where runs go (default runs/experiments/ouro_synthetic[_quick])")
    p.add_argument("--results", type=Path, help="results JSON (default experiments/results/ouro_synthetic[_quick].json)")
    p.add_argument("--report", action="store_true", help="print the results file's tables and stop")
    args = p.parse_args(argv)
    tag = "ouro_synthetic_quick" if args.quick else "ouro_synthetic"
    scale = QUICK if args.quick else FULL
    root = (args.root or REPO / "runs" / "experiments" / tag).resolve()
    path = args.results or RESULTS / f"{tag}.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    if args.report:
        print(report(results))
        return
    results["scale"] = {**scale.__dict__, "mano": MANO, "multihop": MULTIHOP, "K": K, "LOOPS": LOOPS}

    def save():
        save_json(path, results)
        from experiments.ouro_plots import plot_all

        plot_all(results, path.parent, tag)

    data = prepare_data(root, scale)
    for suite in SUITES if args.suite == "all" else (args.suite,):
        run_suite(suite, scale, root, data, results, save)
    save()
    print(f"results: {path}")


if __name__ == "__main__":
    main()
