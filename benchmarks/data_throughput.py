"""Data-pipeline benchmark (not a test): ingestion throughput with 1 and 2 tokenizer workers, and
packed-sequence read throughput from the indexed files.

    python benchmarks/data_throughput.py [--docs 20000] [--words 200] [--seq-len 2048]
"""

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

from pretrain.data import IndexedDataset, PackedDataset, ingest, train_sentencepiece

WORDS = ("the of and to in is was for that with as on by at from his her which an be this are had not but "
         "loop layer model token exit gate pass depth train data shard rank batch step memory compute").split()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--docs", type=int, default=20000)
    p.add_argument("--words", type=int, default=200, help="mean words per document")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--reads", type=int, default=2000)
    args = p.parse_args()
    rng = random.Random(0)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 2 * args.words))) for _ in range(args.docs)]
        src = tmp / "docs.jsonl"
        src.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
        tok = tmp / "tok.model"
        train_sentencepiece(texts[:2000], tok, 512)
        report = {"docs": args.docs, "mean_words": args.words}
        for workers in (1, 2):
            start = time.perf_counter()
            header = ingest([str(src)], tok, tmp / f"w{workers}", workers=workers, progress=False)
            seconds = time.perf_counter() - start
            report[f"ingest_workers_{workers}"] = {"docs_per_s": header["num_docs"] / seconds,
                                                  "tokens_per_s": header["num_tokens"] / seconds, "seconds": seconds}
        ds = PackedDataset(IndexedDataset(tmp / "w1"), args.seq_len, seed=0)
        order = [rng.randrange(len(ds)) for _ in range(args.reads)]
        start = time.perf_counter()
        for g in order:
            ds[g]
        seconds = time.perf_counter() - start
        report["read"] = {"seq_len": args.seq_len, "sequences_per_s": args.reads / seconds,
                          "tokens_per_s": args.reads * args.seq_len / seconds}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
