"""Sequence parallelism (DeepSpeed Ulysses) for pretraining: `train.sequence_parallel: N`; and
DeepSpeed's TiledMLP over the sequence: `train.tiled_mlp: tiles` (`tile_mlps`).

Every sample's sequence is split over N consecutive ranks (a sequence-parallel group); the data
sampler, ZeRO's averaging and the batch arithmetic see world / N data-parallel ranks. Each rank
embeds, projects, runs the MLPs, the gate and the loss on its slice only; in every layer of every
pass, DeepSpeed's `DistributedAttention` exchanges heads for sequence with an all-to-all, so that
attention runs over the whole sequence for H / N heads, and exchanges back. The model is not
touched beyond `SelfAttention.attention_fn`, which this module sets.

What stays exact across the split:
* RoPE: every slice carries its own global position ids (from the data).
* Packed documents: the attention mask is built once per micro-batch from the whole sequence's
  position ids (`shard` does it before slicing), and used by every layer application.
* The loss: labels are shifted before slicing (a slice's last token is trained on the first token
  of the next slice); the trainer's normaliser counts the targets of every slice once, and DeepSpeed
  sums gradients over the sequence-parallel group and averages over the data-parallel ranks.
* Statistics (per-pass CE, exit probabilities, targets) are per-token sums of each slice, reduced
  over all ranks once, as without sequence parallelism.
"""

import contextlib

import torch

from looplm.attention import attention, build_attention_mask
from looplm.objectives import shift_labels


class SequenceParallel:
    def __init__(self, model, size: int):
        from deepspeed.runtime.sequence_parallel import parallel_state_sp as mpu
        from deepspeed.sequence.layer import DistributedAttention

        if mpu._SEQUENCE_PARALLEL_GROUP is not None:  # an earlier run in this process (tests, tools)
            mpu._release_sequence_parallel_groups()
        mpu.initialize_sequence_parallel(size)
        self.mpu, self.size = mpu, size
        self.rank = mpu.get_sequence_parallel_rank()
        self.mask = None  # the whole sequence's AttentionMask of the current micro-batch
        self.layers = [layer.self_attn for layer in model.model.layers]
        group = mpu.get_sequence_parallel_group()
        for attn in self.layers:
            # (B, S/N, H, h) in, scatter heads (dim 2), gather sequence (dim 1); and back after attention.
            distributed = DistributedAttention(self._local_attention, group, scatter_idx=2, gather_idx=1)
            attn.attention_fn = self._attention_fn(distributed, attn.backend)

    def _attention_fn(self, distributed, backend):
        def attention_fn(q, k, v, mask):  # q (B, H, S/N, h) -> (B, S/N, H, h); the slice's mask is unused
            return distributed(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 0, None, backend)

        return attention_fn

    def _local_attention(self, q, k, v, backend):  # (B, S, H/N, h): the whole sequence, this rank's heads
        return attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), self.mask, backend)

    def shard(self, batch: dict) -> dict:
        """A micro-batch of whole sequences -> this rank's slice: input_ids, position_ids, the shifted
        `targets`, and `mask`, the whole sequence's AttentionMask; the trainer pops the mask into
        `self.mask` before the micro-batch's forward (the layers read it there)."""
        ids, positions = batch["input_ids"], batch["position_ids"]
        S = ids.shape[1]
        if S % self.size:
            raise ValueError(f"sequence length {S} is not divisible by train.sequence_parallel={self.size}")
        part = slice(self.rank * S // self.size, (self.rank + 1) * S // self.size)
        return {"input_ids": ids[:, part], "position_ids": positions[:, part],
                "targets": shift_labels(batch["labels"])[:, part], "mask": build_attention_mask(S, 0, None, positions)}

    @contextlib.contextmanager
    def disabled(self):
        """Whole sequences on every rank (evaluation, generation): the plain attention call."""
        saved = [attn.attention_fn for attn in self.layers]
        for attn in self.layers:
            attn.attention_fn = None
        try:
            yield
        finally:
            for attn, fn in zip(self.layers, saved):
                attn.attention_fn = fn


def tile_mlps(model, tiles: int) -> None:
    """DeepSpeed's TiledMLP (ALST) on every shared layer's MLP (`train.tiled_mlp: tiles`): the MLP runs
    over `tiles` slices of the sequence without keeping its intermediates (gate, up, activation,
    product: 4 x intermediate_size values per token and application) and recomputes them slice by slice
    in backward, so they never exist for the whole sequence at once. Without grad (evaluation,
    generation) the plain forward runs."""
    from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledMLP

    for layer in model.model.layers:
        mlp = layer.mlp
        params = [mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight]
        plain = type(mlp).forward

        def forward(x, mlp=mlp, params=params, plain=plain):
            if not torch.is_grad_enabled():
                return plain(mlp, x)
            return TiledMLP.apply(plain, mlp, x, tiles, params)

        mlp.forward = forward


def targets_of(batch: dict) -> torch.Tensor:
    """The shifted labels of a micro-batch, whether already sliced (`targets`) or whole (`labels`)."""
    return batch["targets"] if "targets" in batch else shift_labels(batch["labels"])
