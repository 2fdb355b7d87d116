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
"""

import torch
from transformers import Cache

from .config import KV_SHARING_MODES


class LoopCache(Cache):
    is_compileable = False

    def __init__(self, num_layers: int, sharing: str = "none"):
        super().__init__(layers=[])
        if sharing not in KV_SHARING_MODES:
            raise ValueError(f"LoopCache sharing={sharing!r} is unknown; use one of {KV_SHARING_MODES}")
        self.num_layers, self.sharing = num_layers, sharing
        self.num_steps: int | None = None  # passes per token, fixed by the first forward
        self.keys: list[torch.Tensor] = []  # slot -> (B, K, S_cached, h)
        self.values: list[torch.Tensor] = []
        self.exit_steps: torch.Tensor | None = None  # (B, S_cached) exit pass of each cached token

    # --- what the model uses -------------------------------------------------------------------
    def past(self, step: int, layer: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Cached (k, v) that pass `step`, layer `layer` attends to, or None when empty."""
        if not self.keys:
            return None
        slot = layer if self.sharing != "none" else step * self.num_layers + layer
        return self.keys[slot], self.values[slot]

    def check_steps(self, num_steps: int) -> None:
        if self.num_steps is not None and num_steps != self.num_steps:
            raise ValueError(f"this cache was filled with {self.num_steps} passes per token, the call asks for "
                             f"{num_steps}; keep num_steps fixed for one generation or start a new cache")

    def append(self, new_kv: list[list[tuple[torch.Tensor, torch.Tensor]]], exit_steps: torch.Tensor) -> None:
        """Store a forward's new tokens. new_kv[t][l] = (k, v) (B, K, S_new, h) of pass t, layer l
        (copy-forward already applied to exited tokens); exit_steps (B, S_new)."""
        self.check_steps(len(new_kv))
        self.num_steps = len(new_kv)
        if self.sharing == "none":
            slots = [kv for step in new_kv for kv in step]
        elif self.sharing == "last":
            slots = new_kv[-1]
        else:
            slots = [tuple(torch.stack([new_kv[t][l][i] for t in range(len(new_kv))]).mean(0) for i in (0, 1))
                     for l in range(self.num_layers)]
        if not self.keys:
            self.keys, self.values = [k for k, _ in slots], [v for _, v in slots]
            self.exit_steps = exit_steps
            return
        self.keys = [torch.cat([old, k], dim=2) for old, (k, _) in zip(self.keys, slots)]
        self.values = [torch.cat([old, v], dim=2) for old, (_, v) in zip(self.values, slots)]
        self.exit_steps = torch.cat([self.exit_steps, exit_steps], dim=1)

    # --- the transformers Cache interface that generate() uses ---------------------------------
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0 if not self.keys else self.keys[0].shape[2]

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    @property
    def is_initialized(self) -> bool:
        return bool(self.keys)

    @property
    def batch_size(self) -> int:
        return self.keys[0].shape[0]

    def __len__(self) -> int:
        return len(self.keys)

    def _map(self, fn) -> None:
        self.keys = [fn(x) for x in self.keys]
        self.values = [fn(x) for x in self.values]
        if self.exit_steps is not None:
            self.exit_steps = fn(self.exit_steps)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map(lambda x: x.index_select(0, beam_idx.to(x.device)))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map(lambda x: x[indices])

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map(lambda x: x.repeat_interleave(repeats, dim=0))

    def crop(self, max_length: int) -> None:
        if max_length < 0:
            max_length = self.get_seq_length() + max_length
        self.keys = [x[:, :, :max_length] for x in self.keys]
        self.values = [x[:, :, :max_length] for x in self.values]
        if self.exit_steps is not None:
            self.exit_steps = self.exit_steps[:, :max_length]

    def reset(self) -> None:
        self.keys, self.values, self.exit_steps, self.num_steps = [], [], None, None

    def memory_bytes(self) -> int:
        """Bytes held by cached keys and values."""
        return sum(x.numel() * x.element_size() for x in self.keys + self.values)
