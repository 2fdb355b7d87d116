"""Training benchmark (not a test): tokens/s, TFLOP/s and MFU for a config and world size, and the
optimizer-state and peak memory per rank for ZeRO 1, 2 and 3 (the sharding), each under the real
launcher (`deepspeed --num_gpus W launch/pretrain.sh`).

    python benchmarks/train_throughput.py                                    # CPU: 2 ranks, a ~20M-param LoopLM
    python benchmarks/train_throughput.py --gpus 1 --stages 1 --steps 30 \\
        --set model.preset=ouro-1.4b model.overrides={} data.seq_len=4096 train.global_batch=4 \\
              train.micro_batch=1 train.bf16=true train.activation_checkpointing=true   # 1.4B MFU at 4K on one GPU
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CPU_MODEL = ("{vocab_size: 256, hidden_size: 512, intermediate_size: 1536, num_hidden_layers: 6, "
             "num_attention_heads: 8, num_key_value_heads: 8, head_dim: 64, total_ut_steps: 4}")


def run(stage: int, args, out: Path) -> dict:
    overrides = [f"model.overrides={CPU_MODEL}", "data.seq_len=256", "train.global_batch=8", "train.micro_batch=2",
                 "train.bf16=false", "train.eval_max_prompts=0", "train.eval_batches=1", "train.save_every=100000",
                 "train.log_every=1000", "train.spike_factor=0", f"data.default_corpus_dir={args.corpus}",
                 *args.set, f"train.zero_stage={stage}", f"train.max_steps={args.steps}", f"train.output_dir={out}",
                 "train.resume=none"]
    cmd = [str(Path(sys.executable).with_name("deepspeed")), "--num_gpus", str(args.gpus), "launch/pretrain.sh",
           "--config", args.config, *overrides]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(proc.stdout[-4000:] + proc.stderr[-4000:])
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r][args.warmup:]
    memory = [r for r in records if "memory_per_rank" in r][-1]["memory_per_rank"]
    return {"zero_stage": stage, "tokens_per_s": statistics.median(r["tokens_per_s"] for r in steps),
            "tflops_per_device": statistics.median(r["tflops_per_device"] for r in steps),
            "mfu": statistics.median(r["mfu"] for r in steps), "memory_per_rank": memory}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/smoke.yaml")
    p.add_argument("--gpus", type=int, default=2, help="ranks (GPUs, or CPU processes here)")
    p.add_argument("--stages", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2, help="steps left out of the medians")
    p.add_argument("--corpus", default="runs/bench/data")
    p.add_argument("--set", nargs="*", default=[], help="more section.key=value overrides")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        results = [run(stage, args, Path(tmp) / f"zero{stage}") for stage in args.stages]
    print(json.dumps({"ranks": args.gpus, "overrides": args.set, "results": results}, indent=2))


if __name__ == "__main__":
    main()
