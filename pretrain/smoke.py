"""The main job (`make smoke`): the whole local pretraining workflow on the embedded corpus.

1. prepare the embedded synthetic corpus (tokenizer + indexed files);
2. pretrain a tiny LoopLM with 2 CPU ranks under ZeRO-2 (`bash launch/pretrain.sh configs/smoke.yaml`),
   stopping half-way (train.exit_at_step) and resuming from the checkpoint;
3. export the last checkpoint to a Hugging Face folder (Ouro format);
4. load it and generate with early exit; print a summary (loss per pass, exit distribution,
   held-out accuracy per exit depth, tokens/s, compute saved by early exit) and write it to
   `<output_dir>/summary.json` (`experiments/results/smoke.json` is the committed copy of one).
"""

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from transformers.utils import logging as hf_logging

from looplm import LoopLMForCausalLM

from .config import load_config
from .data import Tokenizer
from .data.synthetic import exact_match, prepare_default_corpus, read_eval
from .export import export

REPO = Path(__file__).resolve().parents[1]


def sh(cmd: list[str]) -> None:
    print("$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=REPO, check=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/smoke.yaml")
    p.add_argument("overrides", nargs="*", help="section.key=value for the training config")
    args = p.parse_args(argv)
    hf_logging.disable_progress_bar()
    cfg = load_config(REPO / args.config, args.overrides)
    out = REPO / cfg.train.output_dir
    corpus = REPO / cfg.data.default_corpus_dir
    for stale in (out / "checkpoints", out / "metrics.jsonl", out / "hf", out / "summary.json"):  # a fresh run each time (data kept)
        shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)

    print("== 1. data: the embedded synthetic corpus", flush=True)
    files = prepare_default_corpus(corpus, seed=cfg.data.seed, progress=False)
    print(f"   {files['data']}.bin/.idx, tokenizer {files['tokenizer']}")

    half = cfg.train.max_steps // 2
    print(f"== 2. pretrain: 2 ranks, ZeRO-{cfg.train.zero_stage}, steps 1-{half}, then resume to "
          f"{cfg.train.max_steps}", flush=True)
    launcher = ["bash", "launch/pretrain.sh", args.config, *args.overrides]
    sh(launcher + [f"train.exit_at_step={half}"])
    sh(launcher)

    print("== 3. export to a Hugging Face folder", flush=True)
    folder = export(out, out / "hf")
    print(f"   {folder}")

    print("== 4. generate with early exit", flush=True)
    model = LoopLMForCausalLM.from_pretrained(folder).eval()
    tok = Tokenizer(folder / "tokenizer.model")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if "loss" in r]
    last, final_eval = train_records[-1], [r for r in records if "accuracy" in r][-1]
    tasks = {t: read_eval(files[t])[:100] for t in ("mano", "multihop")}
    rows = []
    T = model.config.total_ut_steps
    for name, kw in (("full depth", {"exit_threshold": 1.0}), ("early exit q=0.6", {"exit_threshold": 0.6})):
        acc, used = {}, 0
        for task, items in tasks.items():
            completions = []
            for prompt, _ in items:
                ids = torch.tensor([tok.encode(prompt)])
                model.model.layer_token_applications = 0
                with torch.no_grad():
                    seq = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0, **kw)
                used += model.model.layer_token_applications - ids.shape[1] * T * model.config.num_hidden_layers
                completions.append(tok.decode(seq[0, ids.shape[1]:].tolist()))
            acc[task] = exact_match(completions, [a for _, a in items])
        rows.append((name, acc, used))

    summary = {
        "date": time.strftime("%Y-%m-%d"), "machine": f"{platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs", "torch": torch.__version__, "config": args.config, "overrides": args.overrides,
        "steps": last["step"], "tokens_seen": last["tokens_seen"],
        "tokens_per_s": sum(r["tokens_per_s"] for r in train_records[1:]) / max(len(train_records) - 1, 1),
        "final_loss": last["loss"], "ce_per_pass": last["loss_per_pass"], "exit_distribution": last["exit_probs"],
        "valid_ce_per_pass": final_eval.get("valid_loss_per_pass"),
        "heldout_accuracy": {task: {k.split("@")[1]: v for k, v in sorted(final_eval["accuracy"].items())
                                    if k.startswith(task)} for task in ("mano", "multihop")},
        "majority_baseline": {task: max(map(answers.count, set(answers))) / len(answers)
                              for task, answers in ((t, [a for _, a in read_eval(files[t])]) for t in ("mano", "multihop"))},
        "generate": [{"policy": name, "accuracy": acc, "layer_applications": used,
                      "share_of_full_depth": used / max(rows[0][2], 1)} for name, acc, used in rows],
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print_summary(summary)
    print(f"(also in {Path(cfg.train.output_dir) / 'summary.json'})")


def print_summary(s: dict) -> None:
    print("\n== summary")
    print(f"steps {s['steps']}, tokens seen {s['tokens_seen']:,}, training throughput {s['tokens_per_s']:,.0f}"
          " tokens/s (2 CPU ranks)")
    print(f"final loss {s['final_loss']:.4f}; CE per pass [" + " ".join(f"{x:.3f}" for x in s["ce_per_pass"]) + "]")
    print("mean exit distribution over passes [" + " ".join(f"{x:.3f}" for x in s["exit_distribution"]) + "]")
    valid = s["valid_ce_per_pass"]
    print("validation CE per pass " + ("[" + " ".join(f"{x:.3f}" for x in valid) + "]" if valid else
                                       ": none (the validation split is smaller than one batch; see the warning)"))
    print("held-out exact match by exit depth (pass 1..T, and the learned gate at q=config), against the\n"
          "majority baseline (always answering the most frequent held-out answer):")
    for task, accuracy in s["heldout_accuracy"].items():
        cells = " ".join(f"{k}:{v:.2f}" for k, v in accuracy.items())
        print(f"  {task:9s} {cells}   (baseline {s['majority_baseline'][task]:.2f})")
    for row in s["generate"]:
        print(f"generate ({row['policy']}): accuracy mano {row['accuracy']['mano']:.2f}, multihop "
              f"{row['accuracy']['multihop']:.2f}; decode layer applications {row['layer_applications']} "
              f"({row['share_of_full_depth']:.0%} of full depth)")


if __name__ == "__main__":
    try:
        main()
    except subprocess.CalledProcessError as err:
        print(f"error: a step failed: {' '.join(err.cmd)} (exit {err.returncode})", file=sys.stderr)
        raise SystemExit(1)
