"""KV cache of a looped model: one slot per (pass, layer), with decode-time sharing
(spec/ouro.md 3.3).

* sharing "none": slot (t, l) holds the keys/values that pass t, layer l computed for every cached
  token; pass t of a new token attends to slot (t, l). Exactly equal to recomputing without cache.
* sharing "last" / "mean": one slot per layer (T x less memory). Within a forward (the prompt's
  prefill, or a chunk of new tokens) every pass attends to the chunk's own per-pass keys; when the
  forward ends, each token's keys are collapsed into the layer's slot: those of its last pass
  ("last") or their mean over passes ("mean"). Later tokens read that slot at every pass.

Early exit: a token that exits after pass e is not run through passes e+1.. at all. Its keys/values
at those deeper slots are copies of its pass-e keys/values for the same layer ("copy-forward"), so
later tokens see the exited token as it was when it left. `exit_steps` records each cached token's
exit pass.

Storage: one preallocated buffer (2, T or 1, N, B, K, capacity, h) that grows geometrically, so a
decode step writes its new keys in place and attention reads a view (no per-token concatenation).
A forward calls `reserve`, then `update` per (pass, layer) - which writes the new keys of the rows
being computed and returns the slot's keys for the whole batch - and `commit` at the end, which
applies copy-forward (one gather over all passes) and advances the length.
"""

from typing import NamedTuple

import torch
from transformers import Cache

from .config import KV_SHARING_MODES

GROWTH_BLOCK = 256  # capacity is a multiple of this many tokens


class LoopCache(Cache):
    is_compileable = False

    def __init__(self, num_layers: int, sharing: str = "none"):
        super().__init__(layers=[])
        if sharing not in KV_SHARING_MODES:
            raise ValueError(f"LoopCache sharing={sharing!r} is unknown; use one of {KV_SHARING_MODES}")
        self.num_layers, self.sharing = num_layers, sharing
        self.num_steps: int | None = None  # passes per token, fixed by the first forward
        self.kv: torch.Tensor | None = None  # (2, slots_T, N, B, K, capacity, h), slots_T = T ("none") or 1
        self.exits: torch.Tensor | None = None  # (B, capacity) exit pass of each cached token
        self.length = 0
        self._pending: torch.Tensor | None = None  # "mean": this forward's per-pass keys (2, T, N, B, K, S, h)

    # --- what the model uses -------------------------------------------------------------------
    def check_steps(self, num_steps: int) -> None:
        if self.num_steps is not None and num_steps != self.num_steps:
            raise ValueError(f"this cache was filled with {self.num_steps} passes per token, the call asks for "
                             f"{num_steps}; keep num_steps fixed for one generation or start a new cache")

    def reserve(self, num_steps: int, batch: int, new_tokens: int, kv_heads: int, head_dim: int,
                dtype: torch.dtype, device: torch.device) -> None:
        """Make room for `new_tokens` more positions (called once at the start of a forward)."""
        self.check_steps(num_steps)
        self.num_steps = num_steps
        need = self.length + new_tokens
        if self.kv is None or need > self.kv.shape[5]:
            capacity = -(-max(need, 3 * (0 if self.kv is None else self.kv.shape[5]) // 2) // GROWTH_BLOCK) * GROWTH_BLOCK
            slots = num_steps if self.sharing == "none" else 1
            kv = torch.empty(2, slots, self.num_layers, batch, kv_heads, capacity, head_dim, dtype=dtype, device=device)
            exits = torch.empty(batch, capacity, dtype=torch.long, device=device)
            if self.kv is not None:
                kv[..., :self.length, :] = self.kv[..., :self.length, :]
                exits[:, :self.length] = self.exits[:, :self.length]
            self.kv, self.exits = kv, exits
        elif self.kv.shape[3] != batch:
            raise ValueError(f"this cache holds {self.kv.shape[3]} rows, the call has {batch}")
        if self.sharing == "mean":
            self._pending = self.kv.new_empty(2, num_steps, self.num_layers, batch, kv_heads, new_tokens, head_dim)

    @torch.compiler.disable  # in-place bookkeeping on Python ints: compiled layers call it eagerly (no guard per slot)
    def update(self, step: int, layer: int, k: torch.Tensor, v: torch.Tensor, rows: torch.Tensor | None = None,
               frozen: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Store pass `step`, layer `layer`'s new (k, v) (R, K, S, h) of batch rows `rows` (None = all)
        and return what that pass and layer attends to: (k, v) (B, K, cached + S, h), every row.
        frozen (R, S) bool: tokens that already exited keep the keys of their exit pass (copy-forward)."""
        L, S = self.length, k.shape[2]
        slot = self.kv[:, step if self.sharing == "none" else 0, layer]  # (2, B, K, C, h)
        new = slot[..., L:L + S, :]
        if frozen is not None:  # the new positions still hold the previous pass's (exit-pass) keys
            prev = self.kv[:, step - 1, layer, ..., L:L + S, :] if self.sharing == "none" else new
            prev = prev if rows is None else prev[:, rows]
            keep = frozen[:, None, :, None]
            k, v = torch.where(keep, prev[0], k), torch.where(keep, prev[1], v)
        for i, x in enumerate((k, v)):
            if rows is None:
                new[i].copy_(x)
            else:
                new[i].index_copy_(0, rows, x)
            if self._pending is not None:
                target = self._pending[i, step, layer]
                target.copy_(x) if rows is None else target.index_copy_(0, rows, x)
        return slot[0, ..., :L + S, :], slot[1, ..., :L + S, :]

    def commit(self, exit_steps: torch.Tensor, truncated: bool) -> None:
        """End of a forward: exit_steps (B, S) of the new tokens. When tokens exited early
        (`truncated`), fill their deeper slots with copies of their exit pass; "mean" collapses."""
        L, S = self.length, exit_steps.shape[1]
        per_pass = self.kv[..., L:L + S, :] if self.sharing == "none" else self._pending
        if truncated and per_pass is not None:
            T = per_pass.shape[1]
            source = torch.minimum(torch.arange(T, device=exit_steps.device)[:, None, None], exit_steps[None])
            index = source.view(1, T, 1, *exit_steps.shape[:1], 1, S, 1).expand_as(per_pass)
            per_pass.copy_(per_pass.gather(1, index))
        if self.sharing == "mean":
            self.kv[:, 0, ..., L:L + S, :] = self._pending.mean(1)
            self._pending = None
        self.exits[:, L:L + S] = exit_steps
        self.length = L + S

    # --- views ---------------------------------------------------------------------------------
    def _slots(self, i: int) -> list[torch.Tensor]:
        if self.kv is None:
            return []
        return [self.kv[i, t, l, ..., :self.length, :] for t in range(self.kv.shape[1]) for l in range(self.num_layers)]

    @property
    def keys(self) -> list[torch.Tensor]:
        """Per slot (pass-major: t * N + l; one per layer when shared) the cached keys (B, K, S, h)."""
        return self._slots(0)

    @property
    def values(self) -> list[torch.Tensor]:
        return self._slots(1)

    @property
    def exit_steps(self) -> torch.Tensor | None:
        """(B, S_cached) exit pass of each cached token."""
        return None if self.exits is None else self.exits[:, :self.length]

    # --- the transformers Cache interface that generate() uses ---------------------------------
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    @property
    def is_initialized(self) -> bool:
        return self.length > 0

    @property
    def batch_size(self) -> int:
        return self.kv.shape[3]

    def __len__(self) -> int:
        return 0 if self.kv is None else self.kv.shape[1] * self.num_layers

    def _map(self, fn) -> None:
        if self.kv is not None:
            self.kv = fn(self.kv.movedim(3, 0)).movedim(0, 3)
            self.exits = fn(self.exits)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map(lambda x: x.index_select(0, beam_idx.to(x.device)))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map(lambda x: x[indices])

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map(lambda x: x.repeat_interleave(repeats, dim=0))

    def crop(self, max_length: int) -> None:
        if max_length < 0:
            max_length = self.get_seq_length() + max_length
        self.length = max(0, min(self.length, max_length))

    def reset(self) -> None:
        self.kv, self.exits, self.num_steps, self.length, self._pending = None, None, None, 0, None

    def memory_bytes(self) -> int:
        """Bytes of the cached keys and values (the filled part of the buffer)."""
        return 0 if self.kv is None else self.kv[..., :self.length, :].numel() * self.kv.element_size()

    def capacity_bytes(self) -> int:
        """Bytes allocated for keys and values (filled + room to grow)."""
        return 0 if self.kv is None else self.kv.numel() * self.kv.element_size()


class CacheSlot(NamedTuple):
    """What one layer application reads and writes: `cache.update(step, layer, ..., rows, frozen)`."""

    cache: LoopCache
    step: int
    layer: int
    rows: torch.Tensor | None  # batch rows computed (None = all)
    frozen: torch.Tensor | None  # (R, S) tokens of those rows that already exited

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cache.update(self.step, self.layer, k, v, self.rows, self.frozen)
