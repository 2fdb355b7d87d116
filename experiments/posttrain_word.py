"""Post-training that has something to act on: a LoopLM reasoner pretrained by this system on the
GSM8K-shaped word problems to partial competence, then the weaver, trigger, GRPO, LTPO and
Correctness-LTPO measured on its held-out problems.

    python -m experiments.posttrain_word [--root runs/word] [--limit 300]

Every step is the real command, run once (a restarted driver skips the steps whose output exists):

1. data       python -m pretrain.data word-problems          (train / held-out test, GSM8K format)
2. reasoner   bash launch/pretrain.sh configs/experiments/word_reasoner.yaml + pretrain.export
3. weaver     bash launch/posttrain.sh configs/posttrain_sft.yaml      (SFT on the training problems)
4. trigger    bash launch/posttrain.sh configs/posttrain_sft.yaml train.mode=trigger (weaver frozen)
5. grpo       bash launch/posttrain.sh configs/posttrain_grpo.yaml train.joint_head=true
6. head       python -m posttrain.head (on the final weaver's completions of training problems)
7. heads      AUROC / calibration of both heads on held-out completions + reliability diagram
8. table      python -m posttrain.evaluate over the held-out problems, every row

Results: experiments/results/posttrain_word.json (the table, the head report) and
posttrain_word_reliability.png. Test problems are never trained on (pretrain/data/word_problems.py).
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
SFT_STEPS, TRIGGER_STEPS, GRPO_STEPS = 300, 60, 60


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
    """AUROC / calibration error of each head on completions of held-out problems (greedy + 1 sample)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from posttrain.augment import AugmentConfig, delimiter_ids
    from posttrain.correctness import load_head
    from posttrain.data import load_problems
    from posttrain.head import collect, evaluate_head
    from posttrain.reasoner import hidden_size, load_reasoner, load_tokenizer
    from posttrain.trigger import FixedTrigger
    from posttrain.weaver import load_weaver

    torch.manual_seed(0)
    reasoner, tok = load_reasoner(reasoner_dir), load_tokenizer(reasoner_dir)
    weaver = load_weaver(reasoner, weaver_dir)
    augment = AugmentConfig(max_insertions=5, delimiters=["\n"])
    rows = collect(reasoner, weaver, tok, load_problems(str(test_file), limit), augment, FixedTrigger("always"),
                   delimiter_ids(tok, augment.delimiters), 48, samples=2)
    report, fig = {}, plt.figure(figsize=(4.5, 4.5))
    plt.plot([0, 1], [0, 1], "k:", lw=1)
    for name, folder in heads.items():
        head = load_head(folder, hidden_size(reasoner))
        report[name] = evaluate_head(head, rows)
        with torch.no_grad():
            probs = torch.sigmoid(head([r[0] for r in rows], [r[1] for r in rows]))
        labels = torch.tensor([float(r[2]) for r in rows])
        bins = torch.clamp((probs * 10).long(), max=9)
        xs = [float(probs[bins == b].mean()) for b in range(10) if (bins == b).any()]
        ys = [float(labels[bins == b].mean()) for b in range(10) if (bins == b).any()]
        plt.plot(xs, ys, "o-", label=f"{name} (AUROC {report[name]['auroc']:.2f}, ECE {report[name]['ece']:.2f})")
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
    p.add_argument("--root", type=Path, default=REPO / "runs" / "word")
    p.add_argument("--limit", type=int, default=300, help="held-out problems in the table")
    p.add_argument("--head-problems", type=int, default=600, help="training problems the head learns from")
    p.add_argument("--results", type=Path, default=RESULTS / "posttrain_word.json")
    args = p.parse_args(argv)
    root, log = args.root.resolve(), args.root.resolve() / "driver.log"
    started = time.time()
    from pretrain.data.word_problems import prepare_word_problems

    print("== 1. data", flush=True)
    files = prepare_word_problems(root / "data", seed=0, vocab_size=256, **DATA)
    print("== 2. reasoner", flush=True)
    reasoner = root / "reasoner" / "hf"
    if not (reasoner / "config.json").exists():
        sh(["bash", "launch/pretrain.sh", "configs/experiments/word_reasoner.yaml", f"data.blend={files['data']}",
            f"data.tokenizer={files['tokenizer']}", f"train.output_dir={root / 'reasoner'}"], log)
        sh([sys.executable, "-m", "pretrain.export", "--checkpoint", str(root / "reasoner"), "--output", str(reasoner)],
           log)
    common = [f"reasoner.path={reasoner}", f"data.train={files['gsm_train']}"]
    print("== 3. weaver (SFT)", flush=True)
    sft = posttrain("configs/posttrain_sft.yaml", root / "sft", common, SFT_STEPS, log)
    print("== 4. learned trigger", flush=True)
    trigger = posttrain("configs/posttrain_sft.yaml", root / "trigger",
                        common + ["train.mode=trigger", "trigger.policy=learned", f"weaver.init_from={sft}",
                                  "train.lr=0.001"], TRIGGER_STEPS, log)
    print("== 5. GRPO (with the jointly trained correctness head)", flush=True)
    grpo = posttrain("configs/posttrain_grpo.yaml", root / "grpo",
                     common + [f"weaver.init_from={sft}", "train.joint_head=true"], GRPO_STEPS, log)
    print("== 6. correctness head", flush=True)
    head = root / "head"
    if not (head / "report.json").exists():
        sh([sys.executable, "-m", "posttrain.head", "--reasoner", str(reasoner), "--weaver", str(grpo),
            "--data", str(files["gsm_train"]), "--problems", str(args.head_problems), "--samples", "2",
            "--max-new-tokens", "48", "--delimiters", json.dumps(["\n"]), "--output", str(head)], log)
    print("== 7. heads on held-out completions", flush=True)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    heads_file = root / "heads.json"
    if not heads_file.exists():
        heads_file.write_text(json.dumps(head_report(
            reasoner, grpo, {"head (trained after GRPO)": head, "head trained jointly in GRPO": grpo / "head"},
            files["gsm_test"], args.limit, args.results.with_name(args.results.stem + "_reliability.png")), indent=1))
    heads = json.loads(heads_file.read_text())
    print("== 8. the table", flush=True)
    table_dir = root / "table"
    if not (table_dir / "results.json").exists():
        sh([sys.executable, "-m", "posttrain.evaluate", "--reasoner", str(reasoner), "--weaver", str(sft),
            "--grpo-weaver", str(grpo), "--trigger", str(trigger), "--head", str(head), "--joint-head",
            str(grpo / "head"), "--data", str(files["gsm_test"]), "--limit", str(args.limit), "--max-new-tokens", "48",
            "--delimiters", json.dumps(["\n"]), "--output", str(table_dir)], log)
    table = json.loads((table_dir / "results.json").read_text())["table"]
    args.results.write_text(json.dumps({"data": DATA, "steps": {"sft": SFT_STEPS, "trigger": TRIGGER_STEPS,
                                                                "grpo": GRPO_STEPS},
                                        "table": table, "heads": heads}, indent=1))
    from posttrain.evaluate import format_table

    print(format_table(table))
    print(json.dumps(heads, indent=1))
    print(f"results: {args.results} ({time.time() - started:.0f} s)")


if __name__ == "__main__":
    main()
