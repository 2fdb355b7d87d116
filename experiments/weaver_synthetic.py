"""CPU experiment: does a MemGen weaver help a tiny pretrained LoopLM on the synthetic tasks?

    make smoke                                   # pretrains and exports runs/smoke/hf
    python experiments/weaver_synthetic.py [--task mano] [--sft-steps 200] [--grpo-steps 20]

Trains a weaver with SFT (then briefly with GRPO) on fresh training problems of the task and reports
held-out greedy exact-match accuracy: vanilla reasoner, + weaver with prompt augmentation only, and
+ weaver with prompt and inference augmentation. Whatever it shows is what it shows.
"""

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import torch

from posttrain.augment import score_completions
from posttrain.config import load_config
from posttrain.data import load_problems
from posttrain.train import run

REPO = Path(__file__).resolve().parents[1]


def accuracy(system, problems, weaver, augment, batch=25):
    correct = 0
    for i in range(0, len(problems), batch):
        chunk = problems[i:i + batch]
        with torch.no_grad():
            done = score_completions(system.reasoner, weaver, system.tok, chunk, augment, system.trigger,
                                     system.delims, system.cfg.train.max_new_tokens)
        correct += sum(done.correct)
    return correct, len(problems)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reasoner", default="runs/smoke/hf")
    p.add_argument("--task", default="mano", choices=["mano", "multihop"])
    p.add_argument("--sft-steps", type=int, default=200)
    p.add_argument("--grpo-steps", type=int, default=20)
    p.add_argument("--output", default="runs/weaver_experiment")
    args = p.parse_args()
    if not (REPO / args.reasoner / "config.json").exists():
        raise SystemExit(f"no reasoner at {args.reasoner}: run `make smoke` first (it exports runs/smoke/hf)")
    common = [f"reasoner.path={args.reasoner}", f"data.train=synthetic:{args.task}", "train.resume=none",
              "train.log_every=50", "train.max_new_tokens=4", "augment.delimiters=[' ']"]
    started = time.time()
    sft_dir = f"{args.output}/{args.task}/sft"
    system = run(load_config(REPO / "configs/posttrain_sft.yaml", common + [
        f"train.output_dir={sft_dir}", f"train.max_steps={args.sft_steps}", f"train.save_every={args.sft_steps}"]))
    results = {}
    evals = load_problems(f"synthetic:{args.task}", 200, split="eval")
    results["vanilla"] = accuracy(system, evals, None, system.augment)
    results["+weaver (prompt augmentation)"] = accuracy(system, evals, system.weaver,
                                                        replace(system.augment, max_insertions=0))
    results["+weaver (prompt + inference augmentation)"] = accuracy(system, evals, system.weaver, system.augment)
    if args.grpo_steps:
        system = run(load_config(REPO / "configs/posttrain_grpo.yaml", common + [
            f"weaver.init_from={sft_dir}/checkpoints/step_{args.sft_steps}", f"train.output_dir={args.output}/{args.task}/grpo",
            f"train.max_steps={args.grpo_steps}", f"train.save_every={args.grpo_steps}"]))
        results["+weaver after GRPO (prompt + inference augmentation)"] = accuracy(system, evals, system.weaver,
                                                                                  system.augment)
    print(f"\ntask {args.task}: held-out exact match ({len(evals)} problems), reasoner {args.reasoner}, "
          f"weaver SFT {args.sft_steps} steps + GRPO {args.grpo_steps} steps, {time.time() - started:.0f}s")
    print("| setting | correct | accuracy |\n|---|---|---|")
    for name, (c, n) in results.items():
        print(f"| {name} | {c} / {n} | {c / n:.1%} |")
    Path(args.output).mkdir(parents=True, exist_ok=True)
    (Path(args.output) / f"results_{args.task}.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
