"""Memory-mapped indexed token files.

`PREFIX.bin`: the token ids of all documents back to back, in the smallest unsigned dtype that holds
the vocabulary. `PREFIX.idx`: the magic `LOOPIDX1`, a little-endian uint64 header length, a JSON
header (dtype, vocab_size, tokenizer identity, num_docs, num_tokens, empty_documents, sha256 of the
.bin and of the offsets, and since version 2 a SHA-256 digest of every `block_bytes` block of the
.bin: `bin_blocks`), then num_docs + 1 int64 document offsets (in tokens).

Writers write `*.tmp` files and rename them into place, the .idx last: an .idx exists only for a
finished .bin. Readers memory-map both files and check header and sizes on open; `verify()` checks
everything, `verify_blocks()` chosen blocks (training checks all of a small data set, a sample of a
large one, and optionally every block the first time it is read). A .bin paired with another
corpus's .idx fails the block check (the first and last block are always checked).
"""

import hashlib
import json
import os
import struct
from pathlib import Path

import numpy as np

from .errors import DataError

MAGIC = b"LOOPIDX1"
VERSION = 2
BLOCK_BYTES = 64 << 20  # the unit of verification: 64 MiB of .bin


def block_digest(data) -> str:
    return hashlib.sha256(data).hexdigest()


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype that holds ids 0..vocab_size-1."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if vocab_size <= np.iinfo(dtype).max + 1:
            return np.dtype(dtype)
    raise DataError(f"vocab_size {vocab_size} does not fit in uint32")


def paths(prefix: str | Path) -> tuple[Path, Path]:
    prefix = str(prefix)
    for suffix in (".bin", ".idx"):
        if prefix.endswith(suffix):
            prefix = prefix[: -len(suffix)]
    return Path(prefix + ".bin"), Path(prefix + ".idx")


class IndexedWriter:
    """Append documents (token id arrays) to PREFIX.bin/.idx; `finish()` commits, `abort()` removes.

    Offsets are spooled to a temporary file, so memory stays bounded whatever the corpus size."""

    def __init__(self, prefix: str | Path, vocab_size: int, tokenizer: dict, block_bytes: int = BLOCK_BYTES):
        self.bin_path, self.idx_path = paths(prefix)
        self.block_bytes, self._blocks, self._block = block_bytes, [], hashlib.sha256()
        self._block_fill = 0
        self.bin_path.parent.mkdir(parents=True, exist_ok=True)
        self.vocab_size, self.tokenizer, self.dtype = vocab_size, tokenizer, token_dtype(vocab_size)
        self._tmp = [Path(str(p) + ".tmp") for p in (self.bin_path, self.idx_path)] + [
            Path(str(self.idx_path) + ".offsets.tmp")]
        self._bin, self._off = open(self._tmp[0], "wb"), open(self._tmp[2], "wb")
        self._bin_hash, self._off_hash = hashlib.sha256(), hashlib.sha256()
        self.num_docs = self.num_tokens = self.empty_documents = 0
        self._write_offset(0)

    def _write_offset(self, value: int):
        data = struct.pack("<q", value)
        self._off.write(data)
        self._off_hash.update(data)

    def add(self, tokens) -> None:
        """Append one document (its EOS included). An empty document is counted, not stored."""
        arr = np.asarray(tokens, dtype=np.int64)
        if arr.size == 0:
            self.empty_documents += 1
            return
        if arr.min() < 0 or arr.max() >= self.vocab_size:
            bad = int(arr[(arr < 0) | (arr >= self.vocab_size)][0])
            raise DataError(f"document {self.num_docs + self.empty_documents} has token id {bad} outside the "
                            f"vocabulary 0..{self.vocab_size - 1}; the tokenizer and vocab_size disagree")
        data = arr.astype(self.dtype).tobytes()
        self._bin.write(data)
        self._bin_hash.update(data)
        view = memoryview(data)
        while view:  # the block digests, across document boundaries
            take = min(len(view), self.block_bytes - self._block_fill)
            self._block.update(view[:take])
            self._block_fill += take
            view = view[take:]
            if self._block_fill == self.block_bytes:
                self._blocks.append(self._block.hexdigest())
                self._block, self._block_fill = hashlib.sha256(), 0
        self.num_docs += 1
        self.num_tokens += arr.size
        self._write_offset(self.num_tokens)

    def finish(self) -> dict:
        self._bin.close()
        self._off.close()
        header = {
            "version": VERSION, "dtype": self.dtype.name, "vocab_size": self.vocab_size,
            "tokenizer": self.tokenizer, "num_docs": self.num_docs, "num_tokens": self.num_tokens,
            "empty_documents": self.empty_documents, "bin_sha256": self._bin_hash.hexdigest(),
            "offsets_sha256": self._off_hash.hexdigest(), "block_bytes": self.block_bytes,
            "bin_blocks": self._blocks + ([self._block.hexdigest()] if self._block_fill else []),
        }
        blob = json.dumps(header, sort_keys=True).encode()
        with open(self._tmp[1], "wb") as idx, open(self._tmp[2], "rb") as off:
            idx.write(MAGIC + struct.pack("<Q", len(blob)) + blob)
            while chunk := off.read(1 << 20):
                idx.write(chunk)
        os.replace(self._tmp[0], self.bin_path)
        os.replace(self._tmp[1], self.idx_path)
        self._tmp[2].unlink()
        return header

    def abort(self) -> None:
        for f in (self._bin, self._off):
            f.close()
        for p in self._tmp:
            p.unlink(missing_ok=True)


class IndexedDataset:
    """Read-only view of PREFIX.bin/.idx without loading them: `doc(i)` -> np array of token ids."""

    def __init__(self, prefix: str | Path, verify_on_read: bool = False):
        self.bin_path, self.idx_path = paths(prefix)
        self.verify_on_read, self._verified = verify_on_read, set()
        for p in (self.idx_path, self.bin_path):
            if not p.exists():
                raise DataError(f"indexed dataset file {p} does not exist; run `python -m pretrain.data ingest` "
                                "to create it (an .idx appears only when ingestion finished)")
        with open(self.idx_path, "rb") as f:
            head = f.read(16)
            if len(head) < 16 or head[:8] != MAGIC:
                raise DataError(f"{self.idx_path} is not a looplm index (bad magic); re-run ingestion")
            (size,) = struct.unpack("<Q", head[8:])
            try:
                self.header = json.loads(f.read(size))
                self.dtype = np.dtype(self.header["dtype"])
                self.num_docs, self.num_tokens = int(self.header["num_docs"]), int(self.header["num_tokens"])
            except (ValueError, KeyError, TypeError) as err:
                raise DataError(f"{self.idx_path} has a corrupted header ({err}); re-run ingestion") from err
        offsets_at = 16 + size
        expected = offsets_at + 8 * (self.num_docs + 1)
        if self.idx_path.stat().st_size != expected:
            raise DataError(f"{self.idx_path} is {self.idx_path.stat().st_size} bytes, its header implies {expected}: "
                            "truncated or corrupted; re-run ingestion")
        if self.bin_path.stat().st_size != self.num_tokens * self.dtype.itemsize:
            raise DataError(f"{self.bin_path} is {self.bin_path.stat().st_size} bytes, the index implies "
                            f"{self.num_tokens * self.dtype.itemsize}: truncated or corrupted; re-run ingestion")
        self.offsets = np.memmap(self.idx_path, dtype="<i8", mode="r", offset=offsets_at, shape=(self.num_docs + 1,))
        if self.offsets[0] != 0 or self.offsets[-1] != self.num_tokens:
            raise DataError(f"{self.idx_path} offsets do not span the {self.num_tokens} tokens; re-run ingestion")
        self.tokens = (np.memmap(self.bin_path, dtype=self.dtype, mode="r") if self.num_tokens
                       else np.zeros(0, self.dtype))
        self.lengths = np.diff(self.offsets)
        self.vocab_size = int(self.header["vocab_size"])

    def __len__(self) -> int:
        return self.num_docs

    def doc(self, i: int) -> np.ndarray:
        start, end = int(self.offsets[i]), int(self.offsets[i + 1])
        if self.verify_on_read and self.num_blocks:
            size = self.header["block_bytes"]
            first, last = start * self.dtype.itemsize // size, max(end * self.dtype.itemsize - 1, 0) // size
            for b in range(first, last + 1):
                if b not in self._verified:
                    self.verify_blocks([b])
                    self._verified.add(b)
        return self.tokens[start:end]

    def verify(self) -> None:
        """Recompute the checksums of the .bin and of the offsets (reads everything once)."""
        bin_hash = hashlib.sha256()
        with open(self.bin_path, "rb") as f:
            while chunk := f.read(1 << 22):
                bin_hash.update(chunk)
        if bin_hash.hexdigest() != self.header["bin_sha256"]:
            raise DataError(f"{self.bin_path} does not match the checksum in {self.idx_path}: corrupted; re-run ingestion")
        off_hash = hashlib.sha256()
        for start in range(0, len(self.offsets), 1 << 20):
            off_hash.update(self.offsets[start:start + (1 << 20)].tobytes())
        if off_hash.hexdigest() != self.header["offsets_sha256"]:
            raise DataError(f"{self.idx_path} offsets do not match their checksum: corrupted; re-run ingestion")

    @property
    def num_blocks(self) -> int | None:
        """Blocks with a recorded digest; None for an index written before block checksums."""
        blocks = self.header.get("bin_blocks")
        return None if blocks is None else len(blocks)

    def verify_blocks(self, blocks) -> None:
        """Check the given .bin blocks against their digests in the .idx."""
        size, digests = self.header["block_bytes"], self.header["bin_blocks"]
        raw = self.tokens.view(np.uint8) if self.num_tokens else np.zeros(0, np.uint8)
        for b in blocks:
            if block_digest(raw[b * size:(b + 1) * size]) != digests[b]:
                raise DataError(f"{self.bin_path} block {b} (bytes {b * size}..{min((b + 1) * size, raw.size)}) does not "
                                f"match its checksum in {self.idx_path}: the .bin is corrupted or belongs to another "
                                "index; re-run ingestion (python -m pretrain.data ingest ... --overwrite)")

    def choose_blocks(self, mode: str, sample: int, seed: int = 0) -> list[int]:
        """The blocks a `data.verify` mode checks at start: full = all; sample = the first, the last and
        up to `sample` in all, drawn by `seed` (all of a data set of at most `sample` blocks); off = none."""
        n = self.num_blocks or 0
        if mode == "off" or n == 0:
            return []
        if mode == "full" or n <= sample:
            return list(range(n))
        rng = np.random.default_rng(seed)
        middle = rng.choice(np.arange(1, n - 1), size=max(sample - 2, 0), replace=False).tolist()
        return sorted({0, n - 1, *middle})

    def check_vocab(self, model_vocab_size: int) -> None:
        if self.vocab_size > model_vocab_size:
            raise DataError(f"{self.idx_path} was tokenized with a vocabulary of {self.vocab_size} ids but the model "
                            f"has vocab_size={model_vocab_size}; use the matching tokenizer or enlarge the model")

    def check_tokenizer(self, identity: dict) -> None:
        if self.header["tokenizer"] != identity:
            raise DataError(f"{self.idx_path} was made with tokenizer {self.header['tokenizer']}, not {identity}; "
                            "re-ingest with this tokenizer or use the one it was made with")


def main(argv=None):
    import argparse

    from runtime.cli import cli_main

    @cli_main(errors=(DataError,))
    def run(argv):
        p = argparse.ArgumentParser(description="Show (and with --verify, checksum) an indexed dataset.")
        p.add_argument("prefix")
        p.add_argument("--verify", action="store_true", help="recompute the checksums (reads every byte)")
        args = p.parse_args(argv)
        ds = IndexedDataset(args.prefix)
        if args.verify:
            ds.verify()
        print(json.dumps({**ds.header, "verified": args.verify}, indent=2, sort_keys=True))

    run(argv)

