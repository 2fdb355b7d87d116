"""What verifying data costs (not a test): seconds to check 1 GiB of .bin blocks against the index,
and the `data.verify: sample` default on a large data set, extrapolated from the measured speed.

    python benchmarks/data_verify.py [--gib 1] [--repeats 3]

Writes a random token file of --gib GiB (uint16) with its index, then times, in alternation:
`verify_blocks` over every block (SHA-256, what `data.verify: full` does at start), the whole-file
SHA-256 of `pretrain.data inspect --verify`, and the sampled default's block choice. The file is in
the page cache (just written); from a cold disk the read speed of the storage bounds both.
"""

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from pretrain.config import DataConfig
from pretrain.data import IndexedDataset, IndexedWriter
from pretrain.data.indexed import BLOCK_BYTES


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gib", type=float, default=1.0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--large-gib", type=float, default=100.0, help="the data set size to extrapolate to")
    args = p.parse_args()
    defaults = DataConfig()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        writer = IndexedWriter(Path(tmp) / "ds", 50000, {"kind": "benchmark"})
        tokens, doc = int(args.gib * 2**30) // 2, 2**20
        for start in range(0, tokens, doc):
            writer.add(rng.integers(0, 50000, min(doc, tokens - start)))
        writer.finish()
        ds = IndexedDataset(Path(tmp) / "ds")
        gib = ds.bin_path.stat().st_size / 2**30
        every = list(range(ds.num_blocks))
        blocks, sha = [], []
        for _ in range(args.repeats):
            blocks.append(timed(lambda: ds.verify_blocks(every)) / gib)
            sha.append(timed(ds.verify) / gib)
    per_gib = statistics.median(blocks)
    sample_gib = defaults.verify_blocks * BLOCK_BYTES / 2**30
    print(f"{gib:.2f} GiB in {len(every)} blocks of {BLOCK_BYTES >> 20} MiB, {args.repeats} alternating repeats")
    print("| check | s / GiB (min) | s / GiB (median) |")
    print("|---|---|---|")
    print(f"| block checksums (SHA-256 per 64 MiB block), data.verify: full | {min(blocks):.2f} | {per_gib:.2f} |")
    print(f"| whole-file SHA-256 + offsets (inspect --verify) | {min(sha):.2f} | {statistics.median(sha):.2f} |")
    print(f"data.verify: sample (default {defaults.verify_blocks} blocks = {sample_gib:.2f} GiB per file) on a "
          f"{args.large_gib:.0f} GiB data set: about {sample_gib * per_gib:.1f} s; data.verify: full on it: about "
          f"{args.large_gib * per_gib / 60:.1f} min (extrapolated from the median above)")


if __name__ == "__main__":
    main()
