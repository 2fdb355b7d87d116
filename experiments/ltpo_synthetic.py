"""CPU experiment: the four-row table (vanilla / + weaver / + weaver + LTPO / + weaver +
Correctness-LTPO) and the correctness head's AUROC, on a synthetic task with the tiny LoopLM of
`make smoke` and the weaver of experiments/weaver_synthetic.py.

    make smoke && python experiments/weaver_synthetic.py --task mano
    python experiments/ltpo_synthetic.py --task mano
"""

import argparse
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main():
    from posttrain import evaluate, head

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="mano", choices=["mano", "multihop"])
    p.add_argument("--reasoner", default="runs/smoke/hf")
    p.add_argument("--weaver", default=None, help="default: runs/weaver_experiment/TASK/sft/checkpoints/step_200")
    p.add_argument("--output", default="runs/ltpo_experiment")
    p.add_argument("--head-problems", type=int, default=600)
    args = p.parse_args()
    weaver = args.weaver or f"runs/weaver_experiment/{args.task}/sft/checkpoints/step_200"
    for path, how in ((args.reasoner, "make smoke"), (weaver, "python experiments/weaver_synthetic.py")):
        if not (REPO / path).exists():
            raise SystemExit(f"missing {path}: run `{how}` first")
    out = Path(args.output) / args.task
    head.main(["--reasoner", args.reasoner, "--weaver", weaver, "--data", f"synthetic:{args.task}",
               "--problems", str(args.head_problems), "--samples", "4", "--max-new-tokens", "4", "--max-insertions", "0",
               "--output", str(out / "head")])
    evaluate.main(["--reasoner", args.reasoner, "--weaver", weaver, "--head", str(out / "head"),
                   "--data", f"synthetic:{args.task}", "--limit", "200", "--max-new-tokens", "4", "--max-insertions", "0",
                   "--output", str(out / "eval")])
    report = json.loads((out / "head" / "report.json").read_text())
    print(f"correctness head: validation AUROC {report['valid']['auroc']:.3f}, ECE {report['valid']['ece']:.3f} "
          f"({report['valid']['n']} completions, {report['valid']['positive_rate']:.1%} correct), "
          f"{report['parameters']:,} parameters")


if __name__ == "__main__":
    main()
