"""Resumable, rank-sharded batches over a map-style dataset.

The stream order is fixed by the dataset (shuffled per epoch by its seed). Optimizer step s consumes
the contiguous block [c, c + G) of that order, c = consumed_samples, G = the global batch; data-parallel
rank r takes the r-th of W equal slices of the block and splits it into micro-batches. The state is
the single integer `consumed_samples`, so a run resumed with another number of ranks (same global batch)
continues with exactly the samples that were not consumed, none repeated, none skipped.
"""

import numpy as np
import torch

from .errors import DataError


class RankBatchSampler:
    """Yields lists of dataset indices: this rank's micro-batches, step after step.

    global_batch: samples per optimizer step (all ranks, all micro-batches); micro_batch: per rank per
    forward; rank, world: data-parallel position; consumed_samples: where to start; length: the
    dataset's length, or None for an infinite stream (a partial last step is dropped)."""

    def __init__(self, global_batch: int, micro_batch: int, rank: int, world: int, consumed_samples: int = 0,
                 length: int | None = None):
        if global_batch % (micro_batch * world):
            raise DataError(f"global batch {global_batch} is not a multiple of micro batch {micro_batch} x "
                            f"data-parallel size {world}; adjust train.global_batch or train.micro_batch")
        if not 0 <= rank < world:
            raise DataError(f"rank {rank} is outside 0..{world - 1}")
        self.global_batch, self.micro_batch, self.rank, self.world = global_batch, micro_batch, rank, world
        self.consumed_samples, self.length = consumed_samples, length

    @property
    def accumulation_steps(self) -> int:
        return self.global_batch // (self.micro_batch * self.world)

    def __iter__(self):
        per_rank = self.global_batch // self.world
        start = self.consumed_samples
        while self.length is None or start + self.global_batch <= self.length:
            first = start + self.rank * per_rank
            for m in range(0, per_rank, self.micro_batch):
                yield list(range(first + m, first + m + self.micro_batch))
            start += self.global_batch

    def __len__(self) -> int:
        if self.length is None:
            raise TypeError("an infinite stream has no length")
        steps = max(self.length - self.consumed_samples, 0) // self.global_batch
        return steps * self.accumulation_steps


def collate(samples: list[dict]) -> dict:
    """Stack packed samples into (B, L) int64 tensors."""
    return {key: torch.from_numpy(np.stack([s[key] for s in samples])) for key in samples[0]}


def build_loader(dataset, sampler: RankBatchSampler, num_workers: int = 0):
    """A torch DataLoader over `dataset` in the sampler's order (workers only prefetch: the position
    to save is the trainer's count of consumed samples, not the loader's). It draws its workers' base
    seed from a generator of its own: from torch's global one, every new iterator (one more in a
    resumed run) would shift the RNG state that checkpoints save."""
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers, collate_fn=collate,
                                       persistent_workers=num_workers > 0, generator=torch.Generator().manual_seed(0))
