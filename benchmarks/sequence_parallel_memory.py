"""Peak memory per rank with and without Ulysses sequence parallelism (not a test): the same model,
data and global batch, trained for 2 steps at each sequence length, once in one process and once
on 2 ranks with `train.sequence_parallel=2` (deepspeed runner, gloo on CPU). Peak memory is the
trainer's own `memory_per_rank` record (CUDA max allocated, else peak RSS); the estimate of
pretrain/memory.py is printed beside it.

    python benchmarks/sequence_parallel_memory.py                      # seq 2048 4096 8192, CPU
    python benchmarks/sequence_parallel_memory.py --seq 4096 16384 --cap-mib 6000
    python benchmarks/sequence_parallel_memory.py --seq 8192 --override train.tiled_mlp=4
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def overrides(out: Path, seq: int, sp: int, corpus: Path, extra: list[str]) -> list[str]:
    return [
        "model.overrides={vocab_size: 256, hidden_size: 256, intermediate_size: 512, num_hidden_layers: 2, "
        "num_attention_heads: 4, num_key_value_heads: 4, head_dim: 64, total_ut_steps: 4, "
        f"max_position_embeddings: {max(seq, 512)}}}",
        f"data.default_corpus_dir={corpus}", f"data.seq_len={seq}", "data.valid_fraction=0.0",
        "train.global_batch=1", "train.micro_batch=1", "train.bf16=false", "train.zero_stage=0",
        "train.max_steps=2", "train.save_every=1000", "train.eval_max_prompts=0", "train.log_every=1",
        f"train.sequence_parallel={sp}", f"train.output_dir={out}", "train.spike_factor=0", *extra,
    ]


def run(seq: int, sp: int, root: Path, corpus: Path, extra: list[str]) -> dict:
    out = root / f"seq{seq}_sp{sp}"
    args = overrides(out, seq, sp, corpus, extra)
    if sp == 1:
        cmd = [sys.executable, "-m", "pretrain.train", "--config", "configs/smoke.yaml", *args]
    else:
        from runtime.launch import deepspeed_command

        cmd = deepspeed_command(sp) + ["launch/pretrain.sh", "--config", "configs/smoke.yaml", *args]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        return {"seq": seq, "sp": sp, "error": (proc.stdout + proc.stderr)[-1500:]}
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    ranks = next(r["memory_per_rank"] for r in records if "memory_per_rank" in r)
    estimate = next((line for line in proc.stdout.splitlines() if line.startswith("memory estimate")), "")
    return {"seq": seq, "sp": sp, "overrides": extra, "peak_mib_per_rank": [r["peak_mib"] for r in ranks],
            "tokens_per_s": [r["tokens_per_s"] for r in records if "tokens_per_s" in r][-1], "estimate": estimate}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq", type=int, nargs="+", default=[2048, 4096, 8192])
    p.add_argument("--cap-mib", type=float, default=None, help="a per-rank memory budget to compare the peaks with")
    p.add_argument("--override", nargs="*", default=[], help="more config overrides, e.g. train.tiled_mlp=4")
    p.add_argument("--output", help="also write the rows to this JSON file")
    args = p.parse_args()
    from pretrain.data.synthetic import prepare_default_corpus

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        prepare_default_corpus(root / "corpus", seed=1234)
        for seq in args.seq:
            for sp in (1, 2):
                rows.append(run(seq, sp, root, root / "corpus", args.override))
                print(json.dumps(rows[-1]), flush=True)
    print("\n| seq len | sequence parallel | peak MiB per rank | tokens/s |" + (" fits the cap |" if args.cap_mib else ""))
    print("|---|---|---|---|" + ("---|" if args.cap_mib else ""))
    for r in rows:
        if "error" in r:
            print(f"| {r['seq']} | {r['sp']} | failed | |")
            continue
        peak = max(r["peak_mib_per_rank"])
        fits = (" yes |" if peak <= args.cap_mib else " no |") if args.cap_mib else ""
        print(f"| {r['seq']} | {r['sp']} | {peak:,.0f} | {r['tokens_per_s']:,.0f} |{fits}")
    if args.output:
        Path(args.output).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
