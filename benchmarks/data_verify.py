"""What verifying data costs (not a test): seconds to check 1 GiB of .bin blocks against the index,
and the `data.verify: sample` default on a large data set, extrapolated from the measured speed.

    python benchmarks/data_verify.py [--gib 1] [--repeats 3] > benchmarks/results/data_verify.json

Writes a random token file of --gib GiB (uint16) with its index, then times, in alternation:
`verify_blocks` over every block (SHA-256, what `data.verify: full` does at start), the whole-file
SHA-256 of `pretrain.data inspect --verify`, and the sampled default's block choice. The file is in
the page cache (just written); from a cold disk the read speed of the storage bounds both.
"""

import argparse
import datetime
import json
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
    print(json.dumps({
        "gib": round(gib, 3), "blocks": len(every), "block_mib": BLOCK_BYTES >> 20, "repeats": args.repeats,
        "block_checksums_s_per_gib": {"min": min(blocks), "median": per_gib},  # data.verify: full
        "whole_file_sha256_s_per_gib": {"min": min(sha), "median": statistics.median(sha)},  # inspect --verify
        "extrapolated": {"data_set_gib": args.large_gib, "sample_blocks_per_file": defaults.verify_blocks,
                         "sample_s_per_file": sample_gib * per_gib, "full_minutes": args.large_gib * per_gib / 60},
        "date": datetime.date.today().isoformat()}, indent=2))

if __name__ == "__main__":
    main()
