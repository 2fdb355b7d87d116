"""Pass-asynchronous batched decoding: early exit that pays off at any batch size.

In lock-step decoding (`generate`) every row of a step waits for the deepest row of that step: with
8 rows whose tokens exit at different passes, nearly every step runs all T passes, and at small batch
a pass costs about the same for 3 live rows as for 8 (the weights are read either way), so the
skipped passes save almost nothing. Here each row advances on its own: every tick runs one pass of the
N shared layers for all B rows together, each row at its own pass of its own token (the layers are
the same for every pass, so one batched matmul serves rows at different passes). A row whose token
exits emits it and starts its next token on the next tick.

* `generate_asynchronous`: a fixed batch of prompts. Every tick is a full batch until the first row
  finishes; from then on the finished rows idle, so the row with the most passes in all sets the end.
* `generate_continuous`: a queue of prompts on B rows (continuous batching): when a row's request
  ends, the next prompt is prefilled on its own and takes the row, so the ticks stay full until the
  queue runs dry and the cost per token follows the mean number of passes, as at batch 1.

This needs the KV sharing "last" (spec/ouro.md 3.3): one cache slot per layer, which each pass of the
current token overwrites at that token's column, so rows at different passes read the same slot
and nothing is gathered. The tokens are those of `model.generate(..., cache=LoopCache(N, "last"))`
with the same exit policy (tested); greedy decoding, exit policies "threshold", "fixed" and "last".
"""

from functools import partial
from typing import NamedTuple

import torch

from .attention import AttentionMask, position_ids_from_mask
from .cache import LoopCache
from .exits import exit_distribution, resolve_exit_policy


class ColumnSlot(NamedTuple):
    """A layer's cache slot where every row writes its current token at its own column."""

    slot: torch.Tensor  # (2, B, K, C, h) the layer's keys and values
    columns: torch.Tensor  # (B,) column of each row's current token
    width: int  # columns attended (max column + 1)
    rows = None

    @torch.compiler.disable
    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch = torch.arange(k.shape[0], device=k.device)
        self.slot[0, batch, :, self.columns] = k[:, :, 0]
        self.slot[1, batch, :, self.columns] = v[:, :, 0]
        return self.slot[0, ..., :self.width, :], self.slot[1, ..., :self.width, :]


class StaticColumnSlot(ColumnSlot):
    """ColumnSlot for the static step: the width is the whole buffer, so nothing varies between
    ticks and the write is compiled with the rest of the step (no graph break)."""

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        index = self.columns.view(-1, 1, 1, 1).expand(-1, k.shape[1], 1, k.shape[3])
        self.slot[0].scatter_(2, index, k.to(self.slot.dtype))
        self.slot[1].scatter_(2, index, v.to(self.slot.dtype))
        return self.slot[0], self.slot[1]


def _policy(model, exit_threshold, exit_at_step):
    T = model.config.total_ut_steps
    policy = resolve_exit_policy(model.config, exit_at_step, exit_threshold)
    if policy.kind not in ("threshold", "fixed", "last"):
        raise ValueError(f"pass-asynchronous decoding supports the exit policies threshold, fixed and last, "
                         f"not {policy.kind!r}; use model.generate for it")
    if policy.kind == "fixed" and not 0 <= int(policy.value) < T:
        raise ValueError(f"exit_at_step={policy.value} is outside 0..{T - 1}; pick a pass that runs")
    return policy


def _prefill(model, input_ids, attention_mask, exit_threshold, exit_at_step):
    """The prompt runs every pass, as in generate(); its keys collapse to the last pass. Returns the
    first new token of each row and the prompt's keys and values (2, N, B, K, P, h)."""
    cache = LoopCache(model.config.num_hidden_layers, "last")
    out = model(input_ids, attention_mask=attention_mask, cache=cache, use_cache=True,
                exit_threshold=exit_threshold, exit_at_step=exit_at_step, logits_to_keep=1)
    return out.logits[:, -1].argmax(-1), cache.kv[:, 0, ..., :input_ids.shape[1], :]


class _Rows:
    """B decoding rows, each with its own request, token, pass, cache column and position."""

    def __init__(self, model, batch: int, capacity: int, max_new_tokens: int, policy, eos_token_id,
                 pad_token_id: int, dtype: torch.dtype, device: torch.device):
        config = model.config
        self.model, self.core, self.policy, self.eos, self.pad = model, model.model, policy, eos_token_id, pad_token_id
        self.T, self.max_new = config.total_ut_steps, max_new_tokens
        self.kv = torch.zeros(2, config.num_hidden_layers, batch, model.model.kv_heads, capacity,
                              config.head_dim, dtype=dtype, device=device)
        # The columns each row attends to: its prompt but not its padding, its tokens so far, the current one.
        self.visible = torch.zeros(batch, capacity, dtype=torch.bool, device=device)
        self.tokens = torch.full((batch, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
        # One tensor, so that an emission advances the first three with one indexed write.
        self.counters = torch.zeros(4, batch, dtype=torch.long, device=device)
        self.produced, self.columns, self.positions, self.passes = self.counters  # views, updated in place
        # A request's column ends at P + max_new_tokens - 1 < capacity: finished rows idle there, in range.
        # RoPE of every position a row can reach (< capacity), looked up per tick instead of recomputed.
        cos, sin = self.core.rotary(torch.arange(capacity, device=device)[None], dtype)
        self.rope_table = cos[0, 0], sin[0, 0]  # (capacity, head_dim) each
        self.done = torch.ones(batch, dtype=torch.bool, device=device)  # a row without a request idles
        self.gates = torch.zeros(batch, self.T, dtype=torch.float32, device=device)
        self.h = torch.zeros(batch, 1, config.hidden_size, dtype=dtype, device=device)
        self.batch = torch.arange(batch, device=device)
        self.applied = torch.zeros((), dtype=torch.long, device=device)  # live-row passes, counted on the device

    def count_applications(self) -> None:
        """Add the live rows' layer applications to the model's counter (one host read, at the end)."""
        self.core.layer_token_applications += int(self.applied) * len(self.core.layers)
        self.applied.zero_()

    def _ended(self, rows: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        ended = self.produced[rows] >= self.max_new
        return ended | (new == self.eos) if self.eos is not None else ended

    def admit(self, rows: torch.Tensor, kv: torch.Tensor, prompt_mask: torch.Tensor, first: torch.Tensor) -> None:
        """Start requests on `rows` (R,): their prompts' keys and values kv (2, N, R, K, P, h), padding
        mask (R, P) and first new tokens (R,) (from the prefill)."""
        P = kv.shape[-2]
        self.kv[:, :, rows, :, :P] = kv
        self.visible[rows] = False
        self.visible[rows, :P] = prompt_mask.bool()
        self.visible[rows, P] = True
        self.columns[rows] = P
        self.positions[rows] = position_ids_from_mask(prompt_mask)[:, -1] + 1
        self.passes[rows], self.gates[rows] = 0, 0.0
        self.tokens[rows] = self.pad
        self.tokens[rows, 0], self.produced[rows] = first, 1
        self.done[rows] = self._ended(rows, first)
        self.h[rows] = self.core.embed_tokens(first)[:, None].to(self.h.dtype)

    def _pass(self, width: int, slot: type) -> tuple[torch.Tensor, torch.Tensor]:
        """One pass of the N shared layers for every row, each at its own pass, attending to the
        first `width` columns. Returns the normed hidden states (B, 1, d) and which rows exit (B,)."""
        core, columns, policy = self.core, self.columns, self.policy
        mask = AttentionMask(dense=self.visible[:, None, None, :width])
        rope = tuple(table[self.positions][:, None, None] for table in self.rope_table)
        z = self.h
        for l, layer in enumerate(core.layers):
            z = layer(z, rope=rope, mask=mask, cache=slot(self.kv[:, l], columns, width))
        z = core.norm(z)
        self.gates[self.batch, self.passes] = core.early_exit_gate(z[:, 0]).squeeze(-1).float()
        if policy.kind == "threshold":
            cdf = torch.cumsum(exit_distribution(self.gates, self.T), -1)[self.batch, self.passes]
            return z, (cdf >= policy.value) | (self.passes == self.T - 1)
        return z, self.passes == (int(policy.value) if policy.kind == "fixed" else self.T - 1)

    def tick(self, static: bool = False) -> torch.Tensor:
        """One pass for every row; rows whose token exits emit it. Returns which rows' requests ended
        at this tick (B,). Dynamic (the default): attention over the columns in use and the LM head on
        the emitting rows only, counted in the model's application counter. static: fixed shapes, no
        host synchronisation and every buffer updated in place (attention over the whole buffer, the
        LM head on every row), leaving the counter alone: the step a CUDA graph captures and replays
        (`_cuda_graph`). Both update the rows by masks, so both emit the same tokens."""
        if static:
            z, exits = self._pass(self.kv.shape[-2], StaticColumnSlot)
        else:
            z, exits = self._pass(int(self.columns.max()) + 1, ColumnSlot)
        live = ~self.done
        emit = exits & live
        if static:
            new = self.model.lm_head(z[:, 0]).argmax(-1)
        else:
            self.applied += live.sum()
            new = torch.zeros_like(self.produced)  # any valid id: read only where a row emits
            rows = emit.nonzero().squeeze(-1)
            if len(rows):
                new[rows] = self.model.lm_head(z[rows, 0]).argmax(-1)
        slot = self.produced.clamp_max(self.max_new - 1)[:, None]
        self.tokens.scatter_(1, slot, torch.where(emit[:, None], new[:, None], self.tokens.gather(1, slot)))
        self.counters[:3].add_(emit.long())  # produced, columns, positions
        self.passes.add_(live).masked_fill_(emit, 0)  # finished rows stay at pass 0 on their last column
        self.visible.scatter_(1, self.columns[:, None], True)
        self.h.copy_(torch.where(emit[:, None, None], self.core.embed_tokens(new)[:, None].to(z.dtype), z))
        ended = emit & self._ended(self.batch, new)
        self.done |= ended
        return ended


def _cuda_graph(step):
    """Capture `step` (a function of preallocated buffers, updated in place) as a CUDA graph after
    one warm-up call on a side stream (which runs for real); returns the graph's replay."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()  # recorded, not run
    return graph.replay


@torch.no_grad()
def generate_asynchronous(model, input_ids: torch.Tensor, max_new_tokens: int,
                          attention_mask: torch.Tensor | None = None, exit_threshold: float | None = None,
                          exit_at_step: int | None = None, eos_token_id: int | None = None,
                          pad_token_id: int = 0, streamer=None, static: bool = False,
                          cuda_graph: bool = False) -> torch.Tensor:
    """Greedy decoding with early exit, each row at its own pass. input_ids (B, P), left-padded with
    `attention_mask` (B, P) when rows differ in length. Returns (B, P + max_new_tokens); a row that
    produced `eos_token_id` is padded with `pad_token_id` after it. `streamer` (a transformers
    streamer) gets the prompt, the first new tokens (from the prefill) and `end()`.

    static: fixed-shape ticks without host synchronisation (`_Rows.tick(static=True)`; the host checks for
    the end every T ticks), same tokens. cuda_graph (a CUDA device): the static tick captured once as
    a CUDA graph and replayed (one launch per tick instead of one per kernel)."""
    policy = _policy(model, exit_threshold, exit_at_step)
    if cuda_graph and input_ids.device.type != "cuda":
        raise ValueError(f"cuda_graph=True needs the model and input_ids on a CUDA device, not {input_ids.device}; "
                         f"use static=True elsewhere")
    B, P = input_ids.shape
    prompt_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    if streamer is not None:
        streamer.put(input_ids.cpu())
    first, kv = _prefill(model, input_ids, attention_mask, exit_threshold, exit_at_step)
    rows = _Rows(model, B, P + max_new_tokens, max_new_tokens, policy, eos_token_id, pad_token_id, kv.dtype,
                 input_ids.device)
    rows.admit(rows.batch, kv, prompt_mask, first)
    step, ticks_per_check = rows.tick, 1
    if (static or cuda_graph) and not bool(rows.done.all()):
        # the host checks for the end every T ticks; ticks after every row ended change nothing
        static_tick = partial(rows.tick, static=True)
        step, ticks_per_check = (_cuda_graph(static_tick) if cuda_graph else static_tick), rows.T
    if streamer is not None:  # after the set-up (and a graph's capture): a clock on it times decoding
        streamer.put(first.cpu())
    while not bool(rows.done.all()):
        for _ in range(ticks_per_check):
            step()
    rows.count_applications()
    if streamer is not None:
        streamer.end()
    return torch.cat([input_ids, rows.tokens], 1)


@torch.no_grad()
def generate_continuous(model, prompts: list[torch.Tensor], max_new_tokens: int, batch_size: int = 8,
                        exit_threshold: float | None = None, exit_at_step: int | None = None,
                        eos_token_id: int | None = None) -> list[torch.Tensor]:
    """Greedy decoding with early exit of a queue of prompts on `batch_size` rows (continuous
    batching): each row at its own pass; when a row's request ends (`max_new_tokens` tokens or
    `eos_token_id`), the next prompt is prefilled and takes the row. prompts: 1-D token tensors of
    any lengths. Returns each prompt's new tokens (up to and including its end of sequence), in the
    prompts' order; each equals `generate_asynchronous` on that prompt alone."""
    policy = _policy(model, exit_threshold, exit_at_step)
    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError(f"batch_size={batch_size} and max_new_tokens={max_new_tokens} must be positive")
    for i, prompt in enumerate(prompts):
        if not torch.is_tensor(prompt) or prompt.dim() != 1 or prompt.numel() == 0 or prompt.is_floating_point():
            raise ValueError(f"prompt {i} is not a non-empty 1-D tensor of token ids; pass one per request")
    if not prompts:
        return []
    device = prompts[0].device
    dtype = next(model.parameters()).dtype
    rows = _Rows(model, min(batch_size, len(prompts)), max(p.numel() for p in prompts) + max_new_tokens,
                 max_new_tokens, policy, eos_token_id, 0, dtype, device)
    queue, owner, results = iter(enumerate(prompts)), {}, [None] * len(prompts)

    def finish_and_refill(row: int) -> None:
        while True:  # a request can end at its first token; then the next one takes the row at once
            if row in owner:
                results[owner.pop(row)] = rows.tokens[row, :int(rows.produced[row])].clone()
            request = next(queue, None)
            if request is None:
                return
            index, prompt = request
            first, kv = _prefill(model, prompt[None], None, exit_threshold, exit_at_step)
            rows.admit(torch.tensor([row], device=device), kv, torch.ones_like(prompt)[None], first)
            owner[row] = index
            if not bool(rows.done[row]):
                return

    for row in range(len(rows.batch)):
        finish_and_refill(row)
    while owner:  # rows whose request ended at its first token were settled by finish_and_refill
        for row in rows.tick().nonzero().squeeze(-1).tolist():
            finish_and_refill(row)
    rows.count_applications()
    return results
