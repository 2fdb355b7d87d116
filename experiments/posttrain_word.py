"""Post-training measured as a reviewer would: a LoopLM reasoner pretrained by this system on the
GSM8K-shaped word problems to partial competence, then the weaver (3 seeds) against vanilla and
against three controls that get the same training without latent memory, the learned trigger, GRPO,
LTPO and Correctness-LTPO; every choice made on a validation split, the test split scored once.

    python -m experiments.posttrain_word [--quick]       # resumable: finished steps are skipped
    python -m experiments.posttrain_word --report        # the table, from the results file

Every step is the real command (`bash launch/posttrain.sh`, `python -m posttrain.evaluate`, ...):

1. data      train / validation / test by solution (`word_problems.split_of`); the held-out splits
             one problem per solution, so problems are independent units for the intervals
2. reasoner  configs/experiments/word_reasoner.yaml (its length fixed in advance: partial competence;
             its validation accuracy is recorded)
3. SFT       per seed: the weaver (`weaver.latents=woven`) and the LoRA SFT controls (`none`: the
             reasoner's LoRA'd copy trained on the same problems and steps, nothing inserted; `pause`:
             the same with learned pause tokens where the latents go); each run's checkpoint chosen on
             validation. Control `more_training`: the reasoner pretrained further for the weaver's
             SFT FLOPs (`sft_cost`), per seed
4. trigger, GRPO (a small grid of LR and group size on validation, seed 1; the share of groups with
             a signal logged), the final weaver (GRPO'd or not) chosen on validation
5. heads     Correctness heads per draft length, compared on validation completions (the draft chosen
             there); the jointly trained head and the LTPO confidence reward: their validation AUROC
6. test      the table, once: accuracy per row with intervals over seeds and problems, paired
             differences vs vanilla, vs the strongest control (chosen on validation), and LTPO rows vs
             the weaver they start from

Results: experiments/results/posttrain_word[_quick].json (no machine paths) and PNGs beside it.
"""

import argparse
import json
import math
import subprocess
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "experiments" / "results"
REASONER_CONFIG = "configs/experiments/word_reasoner.yaml"
POST = ['augment.delimiters=["\\n"]', "train.max_new_tokens=48", "launch.gpus_per_node=1", "train.log_every=50"]
EVAL = ["--max-new-tokens", "48", "--delimiters", json.dumps(["\n"])]
METHODS = {"weaver": "woven", "lora": "none", "pause": "pause"}  # the SFT runs: weaver.latents
CONTROLS = ("lora", "pause", "more_training")
DRAFTS = {"all": None, "8": 8, "0": 0}  # the correctness head reads the whole answer, 8 tokens, nothing


@dataclass(frozen=True)
class Scale:
    train: int  # training problems (pretraining corpus and SFT)
    valid: int  # validation problems (every choice)
    test: int  # test problems (the table)
    reasoner_steps: int | None  # None: the reasoner config's own
    sft_steps: int
    checkpoints: int  # SFT checkpoints scored on validation (evenly spaced)
    trigger_steps: int
    grpo_steps: int
    grpo_grid: tuple  # (lr, group size) candidates, chosen on validation with seed 1
    seeds: tuple
    head_problems: int  # training problems whose completions train each head
    ltpo_test: int  # test problems of the LTPO rows (the first ones): Correctness-LTPO costs ~1 s each


FULL = Scale(train=20000, valid=400, test=1000, reasoner_steps=None, sft_steps=1200, checkpoints=4, trigger_steps=60,
             grpo_steps=60, grpo_grid=((1e-4, 4), (1e-3, 4), (1e-3, 8)), seeds=(1, 2, 3), head_problems=1500,
             ltpo_test=500)
QUICK = Scale(train=20000, valid=80, test=120, reasoner_steps=500, sft_steps=120, checkpoints=2, trigger_steps=10,
              grpo_steps=8, grpo_grid=((1e-4, 4),), seeds=(1, 2), head_problems=60, ltpo_test=40)


def sh(cmd: list, log: Path) -> None:
    log.parent.mkdir(parents=True, exist_ok=True)
    cmd = [str(c) for c in cmd]
    with open(log, "a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        print("$ " + " ".join(cmd), flush=True)
        if subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT).returncode:
            raise SystemExit(f"error: a step failed; see {log}")


def sft_overrides(method: str, seed: int) -> list:
    """The SFT run of a method: the weaver and its controls differ only in `weaver.latents` (tested)."""
    return [f"weaver.latents={METHODS[method]}", f"train.seed={seed}"]


def sft_cost(problems_file: Path, reasoner: Path, steps: int, batch: int, latents: int, max_insertions: int,
             tokenizer: Path | None = None) -> dict:
    """The weaver's SFT in pretraining steps of equal FLOPs. Per example the reasoner processes prompt,
    latents and answer, and the weaver LM its context at each insertion plus K queries; both are frozen
    (LoRA aside), so a position costs a forward and a backward for activations (2 forward units), while a
    pretraining position also computes weight gradients (3 units). Averaged over the training problems,
    times steps x batch; pretraining steps hold global_batch x seq_len positions."""
    from posttrain.augment import delimiter_ids
    from posttrain.data import load_problems
    from posttrain.reasoner import load_tokenizer
    from pretrain.config import load_config

    tok = load_tokenizer(reasoner, tokenizer)
    delims = delimiter_ids(tok, ["\n"])
    reasoner_pos = weaver_pos = 0
    problems = load_problems(str(problems_file))
    for p in problems:
        prompt, answer = tok.encode(p.prompt), tok.encode(p.solution) + [tok.eos_id]
        cuts = [i for i, t in enumerate(answer[:-1]) if t in delims][:max_insertions]
        weaver_pos += len(prompt) + latents  # the prompt latents
        weaver_pos += sum(len(prompt) + latents * (1 + j) + cut + 1 + latents for j, cut in enumerate(cuts))
        reasoner_pos += len(prompt) + len(answer) + latents * (1 + len(cuts))
    per_example = 2 * (reasoner_pos + weaver_pos) / len(problems)
    cfg = load_config(REPO / REASONER_CONFIG)
    per_step = 3 * cfg.train.global_batch * cfg.data.seq_len
    return {"sft_positions_per_example": (reasoner_pos + weaver_pos) / len(problems),
            "pretraining_steps": math.ceil(per_example * steps * batch / per_step)}


class Suite:
    def __init__(self, scale: Scale, root: Path, results: dict, save):
        self.scale, self.root, self.results, self.save = scale, root, results, save
        self.log = root / "driver.log"
        self.choices = results.setdefault("choices", {})

    # --- the commands, each run once ---------------------------------------------------------------
    def data(self) -> dict:
        from pretrain.data.word_problems import prepare_word_problems

        s = self.scale
        self.files = prepare_word_problems(self.root / "data", seed=0, vocab_size=256, train=s.train, valid=s.valid,
                                           test=s.test, max_steps=4, one_per_solution=True)
        return self.files

    def pretrain(self, out: Path, overrides: list) -> Path:
        """Pretrain (or continue) the reasoner into `out` and export it; the exported folder."""
        if not (out / "hf" / "config.json").exists():
            sh(["bash", "launch/pretrain.sh", REASONER_CONFIG, f"data.blend={self.files['data']}",
                f"data.tokenizer={self.files['tokenizer']}", f"train.output_dir={out}", *overrides], self.log)
            sh([sys.executable, "-m", "pretrain.export", "--checkpoint", out, "--output", out / "hf"], self.log)
        return out / "hf"

    def posttrain(self, config: str, out: Path, overrides: list, steps: int, checkpoints: int = 1) -> list:
        """A post-training run; its checkpoints, oldest first (`checkpoints` evenly spaced)."""
        if not (out / "checkpoints" / "latest").exists():
            every = max(steps // checkpoints, 1)
            sh(["bash", "launch/posttrain.sh", config, *POST, f"reasoner.path={self.reasoner}",
                f"data.train={self.files['gsm_train']}", *overrides, f"train.output_dir={out}",
                f"train.max_steps={steps}", f"train.save_every={every}", f"train.keep_last={checkpoints}",
                "train.resume=auto"], self.log)
        return sorted((p for p in (out / "checkpoints").glob("step_*")), key=lambda p: int(p.name.split("_")[1]))

    def evaluate(self, name: str, split: str, rows: str, reasoner: Path | None = None, limit: int | None = None,
                 **parts) -> dict:
        """`posttrain.evaluate` of `rows` on a split; {row: [correct per problem]} (cached in its folder)."""
        out = self.root / "eval" / split / name
        if not (out / "outputs.json").exists():
            flags = [f for k, v in parts.items() if v is not None for f in (f"--{k.replace('_', '-')}", v)]
            sh([sys.executable, "-m", "posttrain.evaluate", "--reasoner", reasoner or self.reasoner, *flags,
                "--data", self.files[f"gsm_{split}"], *(["--limit", limit] if limit else []), *EVAL,
                "--rows", rows, "--output", out], self.log)
        outputs = json.loads((out / "outputs.json").read_text())
        return {row: [int(r["correct"]) for r in results] for row, results in outputs.items()}

    def valid_accuracy(self, name: str, rows: str, **parts) -> float:
        correct = self.evaluate(name, "valid", rows, **parts)[rows.split(",")[-1]]
        return sum(correct) / len(correct)

    # --- the protocol ------------------------------------------------------------------------------
    def run(self) -> None:
        s = self.scale
        print("== 1. data", flush=True)
        self.data()
        print("== 2. reasoner", flush=True)
        self.reasoner = self.pretrain(self.root / "reasoner",
                                      [f"train.max_steps={s.reasoner_steps}"] if s.reasoner_steps else [])
        self.choices["reasoner_valid_accuracy"] = self.valid_accuracy("vanilla", "vanilla")
        self.save()
        print("== 3. SFT: the weaver and the controls", flush=True)
        sft = {(m, seed): self.sft(m, seed) for seed in s.seeds for m in METHODS}
        cost = sft_cost(self.files["gsm_train"], self.reasoner, s.sft_steps, 8, 8, 5)
        self.choices["more_training_steps"] = cost
        more = {seed: self.pretrain(self.root / f"more_training_s{seed}", [
            f"model.init_from={self.reasoner}", f"train.max_steps={cost['pretraining_steps']}", f"train.seed={seed}",
            f"data.seed={1234 + seed}", f"train.save_every={cost['pretraining_steps']}"]) for seed in s.seeds}
        for seed, folder in more.items():
            self.choices.setdefault("more_training_valid_accuracy", {})[str(seed)] = self.valid_accuracy(
                f"more_training_s{seed}", "vanilla", reasoner=folder)
        control = max(CONTROLS, key=lambda c: self.control_valid_accuracy(c))
        self.choices["strongest_control_on_valid"] = control
        self.save()  # each stage's choices land in the results file as the stage ends
        print("== 4. trigger and GRPO", flush=True)
        trigger = {seed: self.posttrain("configs/posttrain_sft.yaml", self.root / f"trigger_s{seed}", [
            "train.mode=trigger", "trigger.policy=learned", f"weaver.init_from={sft['weaver', seed]}", "train.lr=0.001",
            f"train.seed={seed}"], s.trigger_steps)[-1] for seed in s.seeds}
        lr, group = self.choose_grpo(sft)
        grpo = {seed: self.grpo(sft["weaver", seed], seed, lr, group) for seed in s.seeds}
        use_grpo = (sum(self.valid_accuracy(f"grpo_lr{lr:g}_g{group}_s{seed}", "grpo", weaver=sft["weaver", seed],
                                            grpo_weaver=g) for seed, g in grpo.items()) >
                    sum(self.sft_valid_accuracy("weaver", seed) for seed in s.seeds))
        self.choices["ltpo_starts_from"] = "grpo" if use_grpo else "weaver"
        final = {seed: grpo[seed] if use_grpo else sft["weaver", seed] for seed in s.seeds}
        self.save()
        print("== 5. correctness heads", flush=True)
        first = s.seeds[0]  # every draft length for the first seed (the choice), the chosen one for the others
        self.diagnose(final[first], {d: self.head(final[first], first, d) for d in DRAFTS}, grpo[first])
        draft = self.choices["head_draft"]
        heads = {seed: self.head(final[seed], seed, draft) for seed in s.seeds}
        self.save()
        if "test" not in self.results:  # touched once: delete "test" from the results file to rescore
            print("== 6. the test table", flush=True)
            self.results["test"] = self.test(sft, more, trigger, grpo, final, heads, control)
        self.save()

    def sft(self, method: str, seed: int) -> Path:
        """One SFT run; its checkpoint with the best validation accuracy (the earliest of equals)."""
        s = self.scale
        ckpts = self.posttrain("configs/posttrain_sft.yaml", self.root / f"{method}_s{seed}", sft_overrides(method, seed),
                               s.sft_steps, s.checkpoints)
        scores = {c.name: self.valid_accuracy(f"{method}_s{seed}_{c.name}", "weaver", weaver=c) for c in ckpts}
        best = max(ckpts, key=lambda c: (scores[c.name], -int(c.name.split("_")[1])))
        self.choices.setdefault("sft_checkpoint", {})[f"{method}_s{seed}"] = {"valid_accuracy": scores,
                                                                              "chosen": best.name}
        return best

    def sft_valid_accuracy(self, method: str, seed: int) -> float:
        """The validation accuracy of an SFT run's chosen checkpoint (scored when it was chosen)."""
        run = self.choices["sft_checkpoint"][f"{method}_s{seed}"]
        return run["valid_accuracy"][run["chosen"]]

    def control_valid_accuracy(self, control: str) -> float:
        if control == "more_training":
            return sum(self.choices["more_training_valid_accuracy"].values()) / len(self.scale.seeds)
        return sum(self.sft_valid_accuracy(control, seed) for seed in self.scale.seeds) / len(self.scale.seeds)

    def grpo(self, weaver: Path, seed: int, lr: float, group: int) -> Path:
        return self.posttrain("configs/posttrain_grpo.yaml", self.root / f"grpo_lr{lr:g}_g{group}_s{seed}", [
            f"weaver.init_from={weaver}", "train.joint_head=true", f"train.lr={lr}", f"train.group_size={group}",
            "train.kl_beta=0.04", f"train.seed={seed}"], self.scale.grpo_steps)[-1]

    def choose_grpo(self, sft: dict) -> tuple:
        """GRPO's LR and group size on validation (seed 1), with the share of groups that had a signal."""
        seed, grid = self.scale.seeds[0], {}
        for lr, group in self.scale.grpo_grid:
            out = self.grpo(sft["weaver", seed], seed, lr, group)
            records = [json.loads(line) for line in (out.parents[1] / "metrics.jsonl").open()]
            grid[f"lr{lr:g}_g{group}"] = {
                "lr": lr, "group": group, "mixed_groups": sum(r["mixed_groups"] for r in records) / len(records),
                "kl_last": records[-1].get("kl"), "reward_first": records[0]["reward"], "reward_last": records[-1]["reward"],
                "valid_accuracy": self.valid_accuracy(f"grpo_lr{lr:g}_g{group}_s{seed}", "grpo",
                                                      weaver=sft["weaver", seed], grpo_weaver=out)}
        best = max(grid.values(), key=lambda g: g["valid_accuracy"])
        self.choices["grpo"] = {"grid": grid, "weaver_valid_accuracy": self.sft_valid_accuracy("weaver", seed),
                                "chosen": [best["lr"], best["group"]]}
        return best["lr"], best["group"]

    def head(self, weaver: Path, seed: int, draft: str) -> Path:
        out = self.root / f"head_s{seed}_draft{draft}"
        if not (out / "report.json").exists():
            sh([sys.executable, "-m", "posttrain.head", "--reasoner", self.reasoner, "--weaver", weaver, "--data",
                self.files["gsm_train"], "--problems", self.scale.head_problems, "--samples", 2, "--max-new-tokens",
                48, "--delimiters", json.dumps(["\n"]), "--output", out, "--draft-tokens", draft], self.log)
        return out

    def diagnose(self, weaver: Path, heads: dict, grpo: Path) -> None:
        """On validation completions of the final weaver (seed 1): each head's AUROC and calibration (the
        draft chosen: the shortest within 0.02 AUROC of the best), the jointly trained head's, the LTPO
        confidence reward's, and the completion length's (what a head that learned length would track)."""
        if "head_draft" in self.choices:
            return
        from experiments.posttrain_diagnostics import validation_diagnostics

        report = validation_diagnostics(self.reasoner, weaver, {**{f"draft {d}": h for d, h in heads.items()},
                                                                "joint (GRPO)": grpo / "head"},
                                        self.files["gsm_valid"], RESULTS / f"{self.tag}_reliability.png")
        self.choices["valid_diagnostics"] = report
        auc = {d: report["heads"][f"draft {d}"]["auroc"] for d in DRAFTS}
        best = max(auc.values())
        order = sorted(DRAFTS, key=lambda d: math.inf if DRAFTS[d] is None else DRAFTS[d])  # shortest first
        self.choices["head_draft"] = next(d for d in order if auc[d] >= best - 0.02)

    @property
    def tag(self) -> str:
        return "posttrain_word_quick" if self.scale is QUICK else "posttrain_word"

    def test(self, sft, more, trigger, grpo, final, head, control) -> dict:
        """Every test number: per seed, the rows' correctness per problem; then the table."""
        s, per_seed = self.scale, {}
        for seed in s.seeds:
            got = self.evaluate(f"table_s{seed}", "test", "vanilla,weaver_prompt,weaver,trigger,grpo",
                                weaver=sft["weaver", seed], trigger=trigger[seed], grpo_weaver=grpo[seed])
            got.update({f"ltpo_{k}": v for k, v in self.evaluate(
                f"ltpo_s{seed}", "test", "weaver,ltpo,correctness_ltpo", limit=s.ltpo_test, weaver=final[seed],
                head=head[seed]).items()})
            for m in ("lora", "pause"):
                got[m] = self.evaluate(f"{m}_s{seed}", "test", "weaver", weaver=sft[m, seed])["weaver"]
            got["more_training"] = self.evaluate(f"more_training_s{seed}", "test", "vanilla", reasoner=more[seed])[
                "vanilla"]
            per_seed[seed] = got
        return table(per_seed, control, self.files)


KEYS = ("scale", "choices", "test", "table", "seconds")  # what the results file holds
TITLES = {"vanilla": "Vanilla (the reasoner)", "lora": "Control: LoRA SFT, nothing inserted",
          "pause": "Control: LoRA SFT with pause tokens", "more_training": "Control: the reasoner pretrained further "
          "(the weaver's SFT FLOPs)", "weaver_prompt": "+ Weaver (prompt augmentation)",
          "weaver": "+ Weaver (prompt + inference augmentation, <= 5)", "trigger": "+ Weaver, learned trigger",
          "grpo": "+ Weaver after GRPO", "ltpo_weaver": "+ Weaver where LTPO starts (the LTPO rows' problems)",
          "ltpo_ltpo": "+ Weaver + LTPO", "ltpo_correctness_ltpo": "+ Weaver + Correctness-LTPO"}


def table(per_seed: dict, control: str, files: dict) -> dict:
    """Rows with accuracy over seeds and problems; paired vs vanilla, vs the strongest control (weaver
    rows), vs the weaver the LTPO rows start from; the trivial baselines."""
    from experiments.stats import seed_problem_interval
    from posttrain.data import load_problems

    seeds = sorted(per_seed)
    matrix = {row: [per_seed[s][row] for s in seeds] for row in per_seed[seeds[0]]}
    matrix = {k: v for k, v in matrix.items() if k != "ltpo_vanilla"}
    test = load_problems(str(files["gsm_test"]))
    train_answers = Counter(p.answer for p in load_problems(str(files["gsm_train"])))
    majority = train_answers.most_common(1)[0][0]
    rows = [{"row": "majority", "setting": f"Majority answer of the training problems ({majority})",
             "accuracy": sum(p.answer == majority for p in test) / len(test), "n_seeds": 0},
            {"row": "uniform", "setting": "A uniform guess over the answers seen in training",
             "accuracy": 1 / len(train_answers), "n_seeds": 0}]

    def paired(a, b):
        n = len(a[0])
        d = seed_problem_interval([x[:n] for x in a], [x[:n] for x in b])
        return d["diff"], d["ci95"]

    for key in TITLES:
        m = matrix[key]
        entry = seed_problem_interval(m)
        row = {"row": key, "setting": TITLES[key], "accuracy": entry["mean"], "ci95": entry["ci95"],
               "n_seeds": len(seeds), "n_problems": entry["n_problems"]}
        if key != "vanilla":
            row["vs_vanilla"], row["vs_vanilla_ci95"] = paired(m, matrix["vanilla"])
        if key.startswith(("weaver", "trigger", "grpo")):
            row["control"] = control
            row["vs_control"], row["vs_control_ci95"] = paired(m, matrix[control])
        if key in ("ltpo_ltpo", "ltpo_correctness_ltpo"):
            row["vs_weaver"], row["vs_weaver_ci95"] = paired(m, matrix["ltpo_weaver"])
        rows.append(row)
    return {"n_test": len(test), "seeds": seeds, "rows": rows,
            "per_seed_accuracy": {k: [sum(x) / len(x) for x in v] for k, v in matrix.items()}}


def format_table(test: dict) -> str:
    def pt(x, ci):
        return f"{100 * x:+.1f} [{100 * ci[0]:+.1f}, {100 * ci[1]:+.1f}]"

    lines = [f"Test: {test['n_test']} problems (one per solution), seeds {test['seeds']}; accuracy [95% over seeds "
             "and problems]; paired differences in points", "",
             "| setting | seeds | accuracy | vs vanilla | vs strongest control | vs its weaver |", "|---|---|---|---|---|---|"]
    for r in test["rows"]:
        acc = f"{100 * r['accuracy']:.1f}%" + (f" [{100 * r['ci95'][0]:.1f}, {100 * r['ci95'][1]:.1f}]" if "ci95" in r else "")
        cells = [pt(r[k], r[k + "_ci95"]) + (f" ({r['control']})" if k == "vs_control" else "") if k in r else ""
                 for k in ("vs_vanilla", "vs_control", "vs_weaver")]
        lines.append(f"| {r['setting']} | {r['n_seeds']} | {acc} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="reduced size (about 15 minutes here)")
    p.add_argument("--root", type=Path, default=None, help="run folder (default runs/word or runs/word_quick)")
    p.add_argument("--results", type=Path, default=None)
    p.add_argument("--report", action="store_true", help="print the results file's table and stop")
    args = p.parse_args(argv)
    scale, tag = (QUICK, "posttrain_word_quick") if args.quick else (FULL, "posttrain_word")
    path = args.results or RESULTS / f"{tag}.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    results = {k: v for k, v in results.items() if k in KEYS}  # a results file of an earlier driver: its keys go
    if not args.report:
        from experiments.ouro_synthetic import save_json

        started = time.time()
        results.update({"scale": asdict(scale)})
        suite = Suite(scale, (args.root or REPO / "runs" / ("word_quick" if args.quick else "word")).resolve(), results,
                      lambda: save_json(path, results))
        suite.run()
        results["seconds"] = results.get("seconds", 0) + round(time.time() - started)
        if "test" in results:
            results["table"] = results["test"]["rows"]  # the table's rows, as the earlier results file had them
        save_json(path, results)
        from experiments.posttrain_diagnostics import plot_table

        plot_table(results, path.with_name(f"{tag}_table.png"))
    if "test" in results:
        print(format_table(results["test"]))
    print(json.dumps(results.get("choices", {}), indent=1)[:4000])


if __name__ == "__main__":
    main()
