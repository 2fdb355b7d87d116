"""Loops that buy depth, and a gate that spends it per example (spec/ouro.md 3, 5.3, 6.2; Saunshi et al.,
ICLR 2025), on arithmetic chains whose required depth is a per-problem knob (pretrain/data/chains.py).

    python -m experiments.looped_depth [--quick]      # resumable: finished runs are skipped
    python -m experiments.looped_depth --report       # the tables, from the results file

Every run is `bash launch/pretrain.sh configs/experiments/looped_depth.yaml OVERRIDES` followed by
`python -m pretrain.export`. The protocol:

1. LR per architecture on the validation split (seed 1): the grid is extended until the best LR is
   inside it. Architectures: 1 x 1 (iso-parameter), 1 x 3 looped with the stage-I objective (the
   paper's beta schedule), 3 x 1 (iso-FLOP); and 1 x 3 looped with plain last-pass CE at the
   stage-I looped model's LR.
2. Seeds 2.. at each architecture's best LR. The looped objective is chosen on validation.
3. From each stage-I looped model: the same model trained with beta = 0 (entropy regularisation) and
   a stage-II gate (gate-only training).
4. The test split, touched once, at the end: accuracy per depth at the last pass, the exit policies
   (fixed depth 1..T, the learned gate's threshold sweep), depth extrapolation to 2T passes.

One scorer (`pretrain.validation.greedy_answers`, the trainer's): greedy decoding, exact match of the
first word. Intervals: bootstrap over seeds and problems, paired where rows share problems
(experiments/stats.py). Results: experiments/results/looped_depth[_quick].json and PNGs beside it.
"""

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from experiments.ouro_synthetic import Run, bracketed_lr, curves, describe, load, save_json, thin, train_and_export
from experiments.ouro_synthetic import score_problems as score
from experiments.stats import seed_problem_interval

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "experiments" / "results"
CONFIG = "configs/experiments/looped_depth.yaml"
K, T = 1, 3  # the block's layers and the looped model's passes
ARCHS = {  # name: (layers, loops, objective)
    f"{K}x1": (K, 1, "stage1"),  # iso-parameter (stage I at T = 1 is plain CE)
    f"{K}x{T}": (K, T, "stage1"),  # looped, the paper's objective
    f"{K}x{T}_last": (K, T, "last_pass"),  # looped, plain CE of the last pass
    f"{K * T}x1": (K * T, 1, "stage1"),  # iso-FLOP
}
TASK = {"modulus": 7, "max_depth": 3, "train": 60000, "valid": 600, "test": 1500}
QS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)  # exit thresholds swept


@dataclass(frozen=True)
class Scale:
    """What --quick shrinks; the tables are the same."""
    steps: int
    lrs: tuple  # the starting LR grid (extended while its best LR is at an edge)
    seeds: tuple
    stage2_steps: int
    max_extensions: int


FULL = Scale(steps=2500, lrs=(1e-3, 2e-3, 4e-3), seeds=(1, 2, 3), stage2_steps=300, max_extensions=3)
QUICK = Scale(steps=400, lrs=(2e-3,), seeds=(1,), stage2_steps=60, max_extensions=0)


def paper_beta(steps: int) -> str:
    return f"[[0, 0.1], [{steps // 2}, 0.05]]"


def make_run(root: Path, data: Path, scale: Scale, arch: str, lr: float, seed: int, variant: str = "") -> Run:
    """One training run. Runs differ only in the architecture, objective, LR, seed and variant (tested)."""
    layers, loops, objective = ARCHS[arch]
    overrides = {"data.blend": str(data / "train"), "data.tokenizer": str(data / "tokenizer.model"),
                 "data.eval_tasks_dir": str(data), "train.max_steps": scale.steps,
                 "train.eval_every": max(scale.steps // 5, 1),
                 "model.overrides.num_hidden_layers": layers, "model.overrides.total_ut_steps": loops,
                 "ouro.objective": objective, "ouro.beta_schedule": paper_beta(scale.steps),
                 "optim.lr": lr, "train.seed": seed}
    name = f"{arch}_lr{lr:g}_s{seed}"
    if variant == "beta0":
        overrides["ouro.beta_schedule"] = "[[0, 0.0]]"
    elif variant == "stage2":  # gate-only training from the stage-I model of the same seed
        overrides.update({"model.init_from": str(root / "runs" / name / "hf"), "ouro.objective": "stage2",
                          "train.max_steps": scale.stage2_steps, "optim.warmup_steps": 5,
                          "train.eval_every": max(scale.stage2_steps // 3, 1)})
    name += f"_{variant}" if variant else ""
    overrides["train.output_dir"] = str(root / "runs" / name)
    return Run("looped_depth", name, CONFIG, overrides,
               {"arch": arch, "layers": layers, "loops": loops, "objective": overrides["ouro.objective"],
                "lr": lr, "seed": seed, "variant": variant})


def read_problems(path: Path) -> list:
    from pretrain.data.synthetic import read_eval

    return read_eval(path)


def summarize(rows: list[dict]) -> dict:
    """Mean accuracy and passes of per-seed score() results, with the seeds x problems interval."""
    acc = seed_problem_interval([r["correct"] for r in rows])
    return {"accuracy": acc["mean"], "ci95": acc["ci95"], "n_seeds": len(rows),
            "passes": sum(sum(r["passes"]) / len(r["passes"]) for r in rows) / len(rows)}


class Suite:
    def __init__(self, scale: Scale, root: Path, results: dict, save):
        from pretrain.data.chains import prepare_chains

        self.scale, self.root, self.results, self.save = scale, root, results, save
        self.data = prepare_chains(root / "data", seed=0, **TASK)["train"].parent
        self.runs = results.setdefault("runs", {})

    def train(self, run: Run) -> dict:
        """Train and export one run (skipped when the results hold it); its curves and validation score."""
        if run.name in self.runs:
            return self.runs[run.name]
        start = time.time()
        folder = train_and_export(run)
        model, tok = load(folder)
        c = thin(curves(run))
        loops = run.meta["loops"]
        entry = {**run.meta, **describe(model, run), "curves": c, "tokens_trained": c["tokens"][-1],
                 "valid_accuracy": c["eval_accuracy"][-1][f"chains@{loops}"] if c["eval_accuracy"] else None,
                 "overrides": {k: (Path(v).relative_to(self.root).as_posix() if k == "model.init_from" else v)
                               for k, v in run.overrides.items() if not k.startswith(("data.", "train.output"))}}
        entry["seconds"] = round(time.time() - start, 1)
        self.runs[run.name] = entry
        self.save()
        print(f"[{run.name}] validation accuracy {entry['valid_accuracy']:.3f} ({entry['seconds']:.0f} s)", flush=True)
        return entry

    def select_lr(self, arch: str) -> float:
        """The LR with the best validation accuracy (seed 1), the grid extended while the best is at an edge."""
        def score(lr):
            return self.train(make_run(self.root, self.data, self.scale, arch, lr, 1))["valid_accuracy"]

        choice = bracketed_lr(score, self.scale.lrs, self.scale.max_extensions)
        self.results.setdefault("selection", {})[arch] = choice
        return choice["best_lr"]

    def seeds(self, arch: str, lr: float, variant: str = "") -> list[Run]:
        runs = [make_run(self.root, self.data, self.scale, arch, lr, s, variant) for s in self.scale.seeds]
        for run in runs:
            self.train(run)
        return runs

    def run(self) -> None:
        # The last-pass objective trains at the stage-I looped model's LR (a budget choice, stated in the docs).
        best = {arch: self.select_lr(arch) for arch in (f"{K}x1", f"{K}x{T}", f"{K * T}x1")}
        best[f"{K}x{T}_last"] = best[f"{K}x{T}"]
        final = {arch: self.seeds(arch, lr) for arch, lr in best.items()}
        looped = f"{K}x{T}"
        valid = {a: sum(self.runs[r.name]["valid_accuracy"] for r in final[a]) / len(final[a]) for a in (looped, looped + "_last")}
        self.results["selection"]["looped_objective"] = {"valid_accuracy": valid,
                                                        "chosen": max(valid, key=valid.get)}
        final["beta0"] = self.seeds(looped, best[looped], "beta0")
        final["stage2"] = self.seeds(looped, best[looped], "stage2")
        if "test" not in self.results:  # touched once: delete "test" from the results file to rescore
            self.results["test"] = self.test(final)
        if "gate_labels" not in self.results:  # on validation: what stage II learns from (the gate's diagnosis)
            valid = read_problems(self.data / "eval_chains.jsonl")
            from pretrain.data.chains import depth_of

            self.results["gate_labels"] = {
                key: gate_labels([load(Path(r.overrides["train.output_dir"]) / "hf") for r in final[key]], valid,
                                 [depth_of(p) for p, _ in valid]) for key in (f"{K}x{T}", "beta0", "stage2")}
        self.results["summary"] = headline(self.results)
        self.save()

    def test(self, final: dict) -> dict:
        """Every test-split number, from the exported final models (the only use of the test split)."""
        test = read_problems(self.data / "test_chains.jsonl")
        valid = read_problems(self.data / "eval_chains.jsonl")
        from pretrain.data.chains import depth_of

        facts = [(p, a) for p, a in (json.loads(line)["text"].rsplit(" ", 1) for line in
                                     (self.data / "train.jsonl").open()) if depth_of(p) == 1]
        facts = sorted(set(facts))
        depths = [depth_of(p) for p, _ in test]
        answers = [a for _, a in test]
        majority = max(set(answers), key=answers.count)
        out = {"n_test": len(test), "depths": "".join(map(str, depths)), "chance": 1 / TASK["modulus"],
               "majority": answers.count(majority) / len(answers), "archs": {}, "gates": {}}
        models = {key: [load(Path(r.overrides["train.output_dir"]) / "hf") for r in runs] for key, runs in final.items()}
        for key, loaded in models.items():
            loops = loaded[0][0].config.total_ut_steps
            rows = [score(m, tok, test, exit_at_step=loops - 1) for m, tok in loaded]
            entry = {"last_pass": summarize(rows), "per_problem": ["".join(map(str, r["correct"])) for r in rows],
                     "by_depth": {d: seed_problem_interval([[c for c, x in zip(r["correct"], depths) if x == d]
                                                            for r in rows]) for d in sorted(set(depths))}}
            if loops > 1:
                entry["fixed"] = [summarize([score(m, tok, test, exit_at_step=t) for m, tok in loaded]) | {"depth": t + 1}
                                  for t in range(loops)]
                entry["extrapolation"] = [summarize([score(m, tok, test, num_steps=n, exit_at_step=n - 1)
                                                     for m, tok in loaded]) | {"num_steps": n} for n in range(1, 2 * loops + 1)]
            out["archs"][key] = entry
        for key in (f"{K}x{T}", "beta0", "stage2"):  # the learned gates: q chosen on validation, then test
            out["gates"][key] = gate_front(models[key], valid, test, facts, depths)
        return out


@torch.no_grad()
def gate_labels(loaded, items, depths) -> dict:
    """What stage II is taught at the answer: per problem depth, the mean over seeds and problems of
    the first answer token's CE per pass, the stage-II target w_t = sigmoid(k (I_t - gamma)) for
    t = 2..T (I_t: the CE improvement of pass t), and the gate's lambda_t (exit probability given
    pass t is reached) at the prompt's last position."""
    from looplm import left_pad

    seqs, ats = [], []
    for prompt, answer in items:
        ids, head = tok_pair(loaded[0][1], prompt, answer)
        seqs.append(ids)
        ats.append(len(head) - 1)  # predicts the answer's first token
    ids, mask = left_pad(seqs)
    rows = torch.arange(len(seqs))
    at = torch.tensor([ids.shape[1] - len(s) + a for s, a in zip(seqs, ats)])
    target = ids[rows, at + 1]
    ce, w, lam = [], [], []
    for model, _ in loaded:
        k, gamma = model.config.stage2_k, model.config.stage2_gamma
        out = model(ids, attention_mask=mask, output_step_logits=True, use_cache=False)
        step_ce = torch.stack([torch.nn.functional.cross_entropy(lg[rows, at].float(), target, reduction="none")
                               for lg in out.step_logits], -1)  # (problems, T)
        ce.append(step_ce)
        w.append(torch.sigmoid(k * ((step_ce[:, :-1] - step_ce[:, 1:]).clamp_min(0) - gamma)))
        lam.append(out.gate_probs[rows, at].float())
    depth = torch.tensor(depths)
    return {d: {name: torch.cat(v)[depth.repeat(len(loaded)) == d].mean(0).tolist() for name, v in
                (("ce", ce), ("w", w), ("lambda", lam))} | {"n": int((depth == d).sum())}
            for d in sorted(set(depths))}


def tok_pair(tok, prompt: str, answer: str) -> tuple[list, list]:
    """Token ids of the prompt with its answer, and of the prompt alone (checked to be a prefix)."""
    ids, head = tok.encode(f"{prompt} {answer}"), tok.encode(prompt)
    if ids[:len(head)] != head:
        raise ValueError(f"{prompt!r}: the tokenizer does not split the prompt the same with its answer")
    return ids, head


def interpolate(fixed: list, passes: float) -> tuple[int, int, float]:
    """Fixed-depth neighbours of a mean pass count and the weight of the upper one."""
    lo = min(max(int(passes), 1), len(fixed))
    hi = min(lo + 1, len(fixed))
    return lo, hi, (passes - lo) if hi > lo else 0.0


def gate_front(loaded, valid, test, facts, depths) -> dict:
    """The gate's accuracy-vs-passes front on test, each q's gain over the fixed-depth line at the same
    mean passes (paired per problem), the q with the largest gain on validation, and the mean exit
    pass by problem depth (depth 1: the training facts)."""
    def fixed_rows(items):
        return [[score(m, tok, items, exit_at_step=t) for m, tok in loaded] for t in range(T)]

    def gains(items, fixed):
        front = []
        for q in QS:
            rows = [score(m, tok, items, exit_threshold=q) for m, tok in loaded]
            passes = sum(sum(r["passes"]) / len(r["passes"]) for r in rows) / len(rows)
            lo, hi, w = interpolate(fixed, passes)
            line = [[(1 - w) * a + w * b for a, b in zip(fixed[lo - 1][s]["correct"], fixed[hi - 1][s]["correct"])]
                    for s in range(len(rows))]
            front.append({"q": q, **summarize(rows),
                          "vs_fixed_line": seed_problem_interval([r["correct"] for r in rows], line),
                          "rows": rows})
        return front

    valid_front = gains(valid, fixed_rows(valid))
    chosen = max(valid_front, key=lambda f: f["vs_fixed_line"]["diff"])["q"]
    test_fixed = fixed_rows(test)
    test_front = gains(test, test_fixed)
    at = next(f for f in test_front if f["q"] == chosen)
    by_depth = {1: sum(sum(score(m, tok, facts, exit_threshold=chosen)["passes"]) / len(facts)
                       for m, tok in loaded) / len(loaded)}
    for d in sorted(set(depths)):
        by_depth[d] = sum(sum(p for p, x in zip(r["passes"], depths) if x == d) / depths.count(d)
                          for r in at["rows"]) / len(at["rows"])
    for f in valid_front + test_front:
        del f["rows"]
    return {"q_chosen_on_valid": chosen, "valid": valid_front, "test": test_front,
            "fixed": [summarize(rows) | {"depth": t + 1} for t, rows in enumerate(test_fixed)],
            "exit_pass_by_depth": by_depth}


def headline(results: dict) -> dict:
    """The three comparisons of the issue, on the test split, paired over seeds and problems (points)."""
    test, chosen = results["test"], results["selection"]["looped_objective"]["chosen"]
    per = {k: [[int(c) for c in row] for row in v["per_problem"]] for k, v in test["archs"].items()}

    def points(d):
        return {"diff": 100 * d["diff"], "ci95": [100 * x for x in d["ci95"]], "n_seeds": d["n_seeds"]}

    def valid_gain(key):  # the stage-I or the stage-II gate: whichever gains more on validation
        gate = test["gates"][key]
        return next(f for f in gate["valid"] if f["q"] == gate["q_chosen_on_valid"])["vs_fixed_line"]["diff"]

    gate_key = max((f"{K}x{T}", "stage2"), key=valid_gain)
    gate = test["gates"][gate_key]
    at = next(f for f in gate["test"] if f["q"] == gate["q_chosen_on_valid"])
    return {"looped": chosen, "looped_minus_iso_param": points(seed_problem_interval(per[chosen], per[f"{K}x1"])),
            "looped_minus_iso_flop": points(seed_problem_interval(per[chosen], per[f"{K * T}x1"])),
            "gate_front_minus_fixed_depth": points(at["vs_fixed_line"]) | {"gate": gate_key, "q": at["q"],
                                                                             "mean_passes": at["passes"]}}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="reduced size (about 15 minutes)")
    p.add_argument("--root", type=Path, help="where runs go (default runs/experiments/looped_depth[_quick])")
    p.add_argument("--results", type=Path, help="results JSON (default experiments/results/looped_depth[_quick].json)")
    p.add_argument("--report", action="store_true", help="print the results file's tables and stop")
    args = p.parse_args(argv)
    tag = "looped_depth_quick" if args.quick else "looped_depth"
    scale = QUICK if args.quick else FULL
    path = args.results or RESULTS / f"{tag}.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    if args.report:
        print(report(results))
        return
    results.update({"scale": scale.__dict__, "task": TASK, "K": K, "T": T})
    for entry in results.get("runs", {}).values():  # files written before the curves were thinned
        entry["curves"] = thin(entry["curves"])

    def save():
        save_json(path, results)

    Suite(scale, (args.root or REPO / "runs" / "experiments" / tag).resolve(), results, save).run()
    from experiments.looped_depth_plots import plot_all

    plot_all(results, path.parent, tag)
    print(report(results))
    print(f"results: {path}")


def report(results: dict) -> str:
    from experiments.looped_depth_plots import report as tables

    return tables(results)


if __name__ == "__main__":
    main()
