"""Fixed-length training sequences packed from shuffled documents.

Per epoch e, the documents of a split are put in an order shuffled by (seed, e) and concatenated;
sample s of the epoch is tokens [s*L, (s+1)*L) of that stream (the tail shorter than L is dropped).
The samples of an epoch are visited in an order shuffled by (seed, e) as well. Each sample carries
position ids that restart at 0 at every document start (and at the sample start), which is what the
model's attention uses to keep documents apart, and labels in which the first token of every document
is masked (-100): it must not be predicted from the previous document.
"""

import numpy as np

from looplm.objectives import IGNORE_INDEX

from .errors import DataError
from .indexed import IndexedDataset


def _mix(x: np.ndarray, seed: int) -> np.ndarray:
    """splitmix64 of x ^ seed: a per-document hash that needs no permutation table."""
    with np.errstate(over="ignore"):
        z = (x.astype(np.uint64) ^ np.uint64(seed * 0x9E3779B97F4A7C15 % 2**64)) + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def split_documents(num_docs: int, valid_fraction: float, seed: int, split: str) -> np.ndarray:
    """Document ids of the "train" or "valid" split: a document is in valid when its hash falls in the
    first `valid_fraction` of the range, so the split is stable and independent of the other docs."""
    if split not in ("train", "valid"):
        raise DataError(f"split {split!r} is unknown; use 'train' or 'valid'")
    if not 0.0 <= valid_fraction < 1.0:
        raise DataError(f"valid_fraction={valid_fraction} must be in [0, 1)")
    ids = np.arange(num_docs, dtype=np.int64)
    in_valid = _mix(ids, seed) < np.uint64(int(valid_fraction * 2.0**64)) if valid_fraction else np.zeros(num_docs, bool)
    return ids[in_valid] if split == "valid" else ids[~in_valid]


class PackedDataset:
    """Map-style dataset of packed samples: `dataset[g]` for g = epoch * samples_per_epoch + j.

    indexed: IndexedDataset; seq_len: L; split/valid_fraction: which documents; seed: order;
    wrap: True = later epochs reshuffle and continue, False = the dataset ends after one epoch.
    """

    def __init__(self, indexed: IndexedDataset, seq_len: int, seed: int = 0, split: str = "train",
                 valid_fraction: float = 0.0, wrap: bool = True):
        self.indexed, self.seq_len, self.seed, self.wrap = indexed, seq_len, seed, wrap
        self.docs = split_documents(len(indexed), valid_fraction, seed, split)
        self.samples_per_epoch = int(indexed.lengths[self.docs].sum()) // seq_len
        if self.samples_per_epoch == 0:
            raise DataError(f"{indexed.idx_path} {split} split has fewer than seq_len={seq_len} tokens; "
                            "add data, lower seq_len or the valid_fraction")
        self._epoch_cache: dict[int, tuple] = {}

    def __len__(self) -> int:
        """Samples in one epoch (wrap=True datasets can be indexed beyond it)."""
        return self.samples_per_epoch

    def _epoch(self, epoch: int):
        if epoch not in self._epoch_cache:
            rng = np.random.default_rng([self.seed, epoch])
            order = self.docs[rng.permutation(len(self.docs))]
            ends = np.cumsum(self.indexed.lengths[order])
            sample_order = rng.permutation(self.samples_per_epoch)
            self._epoch_cache = {epoch: (order, ends, sample_order)}  # keep one epoch
        return self._epoch_cache[epoch]

    def __getitem__(self, g: int) -> dict:
        epoch, j = divmod(int(g), self.samples_per_epoch)
        if epoch > 0 and not self.wrap:
            raise IndexError(f"sample {g} is past the single epoch of {self.samples_per_epoch} samples")
        order, ends, sample_order = self._epoch(epoch)
        start = int(sample_order[j]) * self.seq_len
        k = int(np.searchsorted(ends, start, side="right"))
        pieces, positions, remaining, offset = [], [], self.seq_len, start - (int(ends[k - 1]) if k else 0)
        while remaining:
            doc = self.indexed.doc(int(order[k]))[offset:offset + remaining]
            pieces.append(doc)
            positions.append(np.arange(len(doc)) + 0)  # restart at every piece: a document or the sample start
            remaining -= len(doc)
            k, offset = k + 1, 0
        input_ids = np.concatenate(pieces).astype(np.int64)
        position_ids = np.concatenate(positions)
        labels = np.where(position_ids == 0, IGNORE_INDEX, input_ids)
        return {"input_ids": input_ids, "position_ids": position_ids, "labels": labels}
