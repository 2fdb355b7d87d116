"""Post-training that has something to act on: a LoopLM reasoner pretrained by this system on the
GSM8K-shaped word problems to partial competence, then the weaver, trigger, GRPO, LTPO and
Correctness-LTPO measured on its held-out problems.

    python -m experiments.posttrain_word [--quick] [--root runs/word] [--limit 300]

Every step is the real command, run once (a restarted driver skips the steps whose output exists):

1. data       python -m pretrain.data word-problems          (train / held-out test, GSM8K format)
2. reasoner   bash launch/pretrain.sh configs/experiments/word_reasoner.yaml + pretrain.export
3. weaver     bash launch/posttrain.sh configs/posttrain_sft.yaml      (SFT on the training problems)
4. trigger    bash launch/posttrain.sh configs/posttrain_sft.yaml train.mode=trigger (weaver frozen)
5. grpo       bash launch/posttrain.sh configs/posttrain_grpo.yaml train.joint_head=true
6. heads      python -m posttrain.head (on the final weaver's completions of training problems), once
              per draft length the head reads: the whole answer, its first DRAFT_SHORT tokens, none
7. report     AUROC / calibration of every head on held-out completions + reliability diagram
8. table      python -m posttrain.evaluate over the held-out problems, every row
9. cost       Correctness-LTPO with each draft head: accuracy against seconds per problem

Results: experiments/results/posttrain_word[_quick].json (the table, the draft-cost rows, the head
report) and posttrain_word[_quick]_reliability.png. Test problems are never trained on
(pretrain/data/word_problems.py). --quick: fewer steps everywhere and 60 held-out problems.
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "experiments" / "results"
DATA = {"train": 20000, "test": 500, "max_steps": 4}
POST = ['augment.delimiters=["\\n"]', "train.max_new_tokens=48", "launch.gpus_per_node=1", "train.log_every=10"]
STEPS = {"reasoner": None, "sft": 1200, "trigger": 60, "grpo": 60}  # None: the reasoner config's own; SFT: 300 left
# the inserted latents harmful (experiments/results/posttrain_word_sft300.json); at 1200 they help
QUICK_STEPS = {"reasoner": 500, "sft": 150, "trigger": 20, "grpo": 10}  # 150 reasoner steps: 0% held-out
DRAFT_SHORT = 8  # tokens: about the first solution line ("4 + 3 = 7 .")


def sh(cmd: list[str], log: Path) -> None:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        print("$ " + " ".join(cmd), flush=True)
        if subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT).returncode:
            raise SystemExit(f"error: a step failed; see {log}")


def last_checkpoint(out: Path) -> Path:
    return out / "checkpoints" / (out / "checkpoints" / "latest").read_text().strip()


def posttrain(config: str, out: Path, overrides: list[str], steps: int, log: Path) -> Path:
    if not (out / "checkpoints" / "latest").exists():
        sh(["bash", "launch/posttrain.sh", config, *POST, *overrides, f"train.output_dir={out}",
            f"train.max_steps={steps}", f"train.save_every={steps}", "train.resume=auto"], log)
    return last_checkpoint(out)


def head_report(reasoner_dir, weaver_dir, heads: dict, test_file: Path, limit: int, png: Path) -> dict:
    """AUROC / calibration error of each head {name: (folder, draft tokens)} on completions of held-out
    problems (greedy + 1 sample; the same completions for every head, cut to the head's draft)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from posttrain.augment import AugmentConfig, delimiter_ids
    from posttrain.correctness import auroc, load_head
    from posttrain.data import load_problems
    from posttrain.head import collect, evaluate_head
    from posttrain.reasoner import hidden_size, load_reasoner, load_tokenizer
    from posttrain.trigger import FixedTrigger
    from posttrain.weaver import load_weaver

    reasoner, tok = load_reasoner(reasoner_dir), load_tokenizer(reasoner_dir)
    weaver = load_weaver(reasoner, weaver_dir)
    augment = AugmentConfig(max_insertions=5, delimiters=["\n"])
    problems, inputs = load_problems(str(test_file), limit), {}
    for draft in {draft for _, draft in heads.values()}:
        torch.manual_seed(0)  # the same sampled completions for every draft length
        inputs[draft] = collect(reasoner, weaver, tok, problems, augment, FixedTrigger("always"),
                                delimiter_ids(tok, augment.delimiters), 48, samples=2, draft_tokens=draft)
    report, fig = {}, plt.figure(figsize=(5, 5))
    plt.plot([0, 1], [0, 1], "k:", lw=1)
    for name, (folder, draft) in heads.items():
        rows = inputs[draft]
        head = load_head(folder, hidden_size(reasoner))
        report[name] = evaluate_head(head, rows)
        with torch.no_grad():
            probs = torch.sigmoid(head([r[0] for r in rows], [r[1] for r in rows]))
        labels = torch.tensor([float(r[2]) for r in rows])
        bins = torch.clamp((probs * 10).long(), max=9)
        xs = [float(probs[bins == b].mean()) for b in range(10) if (bins == b).any()]
        ys = [float(labels[bins == b].mean()) for b in range(10) if (bins == b).any()]
        plt.plot(xs, ys, "o-", label=f"{name} (AUROC {report[name]['auroc']:.2f}, ECE {report[name]['ece']:.2f})")
    if None in inputs:  # the untrained baseline Gnosis is measured against: the completion's mean token log-prob
        rows = inputs[None]
        report["baseline: mean token log-prob (untrained)"] = {
            "auroc": auroc([float(r[1][:, 1].mean()) for r in rows], [r[2] for r in rows]), "ece": None,
            "n": len(rows), "positive_rate": sum(r[2] for r in rows) / len(rows)}
    plt.xlabel("predicted P(correct)")
    plt.ylabel("fraction correct")
    plt.title("correctness heads, held-out completions")
    plt.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return report


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="reduced size (minutes): fewer steps, 60 problems")
    p.add_argument("--root", type=Path, default=None, help="run folder (default runs/word or runs/word_quick)")
    p.add_argument("--limit", type=int, default=None, help="held-out problems in the table (default 300, quick 60)")
    p.add_argument("--head-problems", type=int, default=None,
                   help="training problems the heads learn from (default 1500, quick 120)")
    p.add_argument("--results", type=Path, default=None)
    args = p.parse_args(argv)
    suffix = "_quick" if args.quick else ""
    steps = QUICK_STEPS if args.quick else STEPS
    args.limit = args.limit or (60 if args.quick else 300)
    args.head_problems = args.head_problems or (120 if args.quick else 1500)
    args.results = args.results or RESULTS / f"posttrain_word{suffix}.json"
    root = (args.root or REPO / "runs" / f"word{suffix}").resolve()
    log = root / "driver.log"
    started = time.time()
    from pretrain.data.word_problems import prepare_word_problems

    print("== 1. data", flush=True)
    files = prepare_word_problems(root / "data", seed=0, vocab_size=256, **DATA)
    print("== 2. reasoner", flush=True)
    reasoner = root / "reasoner" / "hf"
    if not (reasoner / "config.json").exists():
        sh(["bash", "launch/pretrain.sh", "configs/experiments/word_reasoner.yaml", f"data.blend={files['data']}",
            f"data.tokenizer={files['tokenizer']}", f"train.output_dir={root / 'reasoner'}",
            *([f"train.max_steps={steps['reasoner']}"] if steps["reasoner"] else [])], log)
        sh([sys.executable, "-m", "pretrain.export", "--checkpoint", str(root / "reasoner"), "--output", str(reasoner)],
           log)
    common = [f"reasoner.path={reasoner}", f"data.train={files['gsm_train']}"]
    print("== 3. weaver (SFT)", flush=True)
    sft = posttrain("configs/posttrain_sft.yaml", root / "sft", common, steps["sft"], log)
    print("== 4. learned trigger", flush=True)
    trigger = posttrain("configs/posttrain_sft.yaml", root / "trigger",
                        common + ["train.mode=trigger", "trigger.policy=learned", f"weaver.init_from={sft}",
                                  "train.lr=0.001"], steps["trigger"], log)
    print("== 5. GRPO (with the jointly trained correctness head)", flush=True)
    grpo = posttrain("configs/posttrain_grpo.yaml", root / "grpo",
                     common + [f"weaver.init_from={sft}", "train.joint_head=true"], steps["grpo"], log)
    print("== 6. correctness heads (whole answer, short draft, no draft)", flush=True)
    heads = {"full": (root / "head", None), "short": (root / f"head_draft{DRAFT_SHORT}", DRAFT_SHORT),
             "none": (root / "head_draft0", 0)}
    for folder, draft in heads.values():
        if not (folder / "report.json").exists():
            sh([sys.executable, "-m", "posttrain.head", "--reasoner", str(reasoner), "--weaver", str(grpo),
                "--data", str(files["gsm_train"]), "--problems", str(args.head_problems), "--samples", "2",
                "--max-new-tokens", "48", "--delimiters", json.dumps(["\n"]), "--output", str(folder),
                "--draft-tokens", "all" if draft is None else str(draft)], log)
    head = heads["full"][0]
    print("== 7. heads on held-out completions", flush=True)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    heads_file = root / "heads.json"
    if not heads_file.exists():
        named = {"head (trained after GRPO)": heads["full"], "head trained jointly in GRPO": (grpo / "head", None),
                 f"head reading {DRAFT_SHORT} draft tokens": heads["short"],
                 "head reading prompt + latents only": heads["none"]}
        heads_file.write_text(json.dumps(head_report(
            reasoner, grpo, named, files["gsm_test"], args.limit,
            args.results.with_name(args.results.stem + "_reliability.png")), indent=1))
    head_quality = json.loads(heads_file.read_text())
    print("== 8. the table", flush=True)
    table_dir = root / "table"
    if not (table_dir / "results.json").exists():
        sh([sys.executable, "-m", "posttrain.evaluate", "--reasoner", str(reasoner), "--weaver", str(sft),
            "--grpo-weaver", str(grpo), "--trigger", str(trigger), "--head", str(head), "--joint-head",
            str(grpo / "head"), "--data", str(files["gsm_test"]), "--limit", str(args.limit), "--max-new-tokens", "48",
            "--delimiters", json.dumps(["\n"]), "--output", str(table_dir)], log)
    table = json.loads((table_dir / "results.json").read_text())["table"]
    from posttrain.evaluate import bootstrap_interval, format_table

    print("== 9. Correctness-LTPO's cost: the draft the head reads", flush=True)
    cost = []
    for name, (folder, draft) in heads.items():
        out = root / f"cost_{name}"
        if not (out / "results.json").exists():
            sh([sys.executable, "-m", "posttrain.evaluate", "--reasoner", str(reasoner), "--weaver", str(sft),
                "--grpo-weaver", str(grpo), "--head", str(folder), "--rows", "correctness_ltpo", "--data",
                str(files["gsm_test"]), "--limit", str(args.limit), "--max-new-tokens", "48",
                "--delimiters", json.dumps(["\n"]), "--output", str(out)], log)
        row = json.loads((out / "results.json").read_text())["table"][0]
        base = [r["correct"] for r in json.loads((table_dir / "outputs.json").read_text())["vanilla"]]
        mine = [r["correct"] for r in json.loads((out / "outputs.json").read_text())["correctness_ltpo"]]
        row.update(vs_vanilla=(sum(mine) - sum(base)) / len(mine),
                   vs_vanilla_ci95=list(bootstrap_interval(mine, baseline=base)))
        cost.append({**row, "setting": f"Correctness-LTPO, draft: {name} "
                                        f"({'whole answer' if draft is None else f'{draft} tokens'})",
                     "draft_tokens": draft})
    args.results.write_text(json.dumps({"quick": args.quick, "data": DATA, "steps": steps, "limit": args.limit,
                                        "head_problems": args.head_problems, "table": table, "draft_cost": cost,
                                        "heads": head_quality}, indent=1))

    print(format_table(table))
    print(format_table(cost))
    print(json.dumps(head_quality, indent=1))
    print(f"results: {args.results} ({time.time() - started:.0f} s)")


if __name__ == "__main__":
    main()
