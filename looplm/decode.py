"""Pass-asynchronous batched decoding: early exit that pays off at any batch size.

In lock-step decoding (`generate`) every row of a step waits for the deepest row of that step: with
8 rows whose tokens exit at different passes, nearly every step runs all T passes, and at small batch
a pass costs about the same for 3 live rows as for 8 (the weights are read either way), so the
skipped passes save almost nothing. Here each row advances on its own: every tick runs one pass of the
N shared layers for all B rows together, each row at its own pass of its own token (the layers are
the same for every pass, so one batched matmul serves rows at different passes). A row whose token
exits emits it and starts its next token on the next tick. Every tick is a full batch, so the cost
per token follows the mean number of passes, as at batch 1.

This needs the KV sharing "last" (spec/ouro.md 3.3): one cache slot per layer, which each pass of the
current token overwrites at that token's column, so rows at different passes read the same slot
and nothing is gathered. The tokens are those of `model.generate(..., cache=LoopCache(N, "last"))`
with the same exit policy (tested); greedy decoding, exit policies "threshold", "fixed" and "last".
"""

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


@torch.no_grad()
def generate_asynchronous(model, input_ids: torch.Tensor, max_new_tokens: int,
                          attention_mask: torch.Tensor | None = None, exit_threshold: float | None = None,
                          exit_at_step: int | None = None, eos_token_id: int | None = None,
                          pad_token_id: int = 0, streamer=None) -> torch.Tensor:
    """Greedy decoding with early exit, each row at its own pass. input_ids (B, P), left-padded with
    `attention_mask` (B, P) when rows differ in length. Returns (B, P + max_new_tokens); a row that
    produced `eos_token_id` is padded with `pad_token_id` after it. `streamer` (a transformers
    streamer) gets the prompt, the first new tokens (from the prefill) and `end()`."""
    config, core = model.config, model.model
    T, N = config.total_ut_steps, config.num_hidden_layers
    policy = resolve_exit_policy(config, exit_at_step, exit_threshold)
    if policy.kind not in ("threshold", "fixed", "last"):
        raise ValueError(f"generate_asynchronous supports the exit policies threshold, fixed and last, not "
                         f"{policy.kind!r}; use model.generate for it")
    if policy.kind == "fixed" and not 0 <= int(policy.value) < T:
        raise ValueError(f"exit_at_step={policy.value} is outside 0..{T - 1}; pick a pass that runs")
    B, P = input_ids.shape
    device = input_ids.device
    prompt_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    if streamer is not None:
        streamer.put(input_ids.cpu())

    # Prefill: the prompt runs every pass, as in generate(); its keys collapse to the last pass.
    cache = LoopCache(N, "last")
    out = model(input_ids, attention_mask=attention_mask, cache=cache, use_cache=True,
                exit_threshold=exit_threshold, exit_at_step=exit_at_step, logits_to_keep=1)
    tokens = out.logits[:, -1].argmax(-1)
    cache.reserve(T, B, max_new_tokens, config.num_key_value_heads, config.head_dim, out.logits.dtype, device)
    result = torch.full((B, P + max_new_tokens), pad_token_id, dtype=torch.long, device=device)
    result[:, :P] = input_ids
    result[:, P] = tokens
    if streamer is not None:
        streamer.put(tokens.cpu())

    produced = torch.ones(B, dtype=torch.long, device=device)
    done = produced >= max_new_tokens
    if eos_token_id is not None:
        done |= tokens == eos_token_id
    valid = torch.cat([prompt_mask.bool(), torch.ones(B, max_new_tokens, dtype=torch.bool, device=device)], 1)
    positions = position_ids_from_mask(prompt_mask)[:, -1] + 1  # position id of each row's current token
    columns = torch.full((B,), P, dtype=torch.long, device=device)  # its cache column
    passes = torch.zeros(B, dtype=torch.long, device=device)  # its pass about to run
    gates = torch.zeros(B, T, dtype=torch.float32, device=device)
    h = core.embed_tokens(tokens)[:, None]
    batch = torch.arange(B, device=device)
    slots = cache.kv[:, 0]  # (2, N, B, K, C, h)

    while not bool(done.all()):
        width = int(columns.max()) + 1
        keys = torch.arange(width, device=device)
        mask = AttentionMask(dense=((keys[None] <= columns[:, None]) & valid[:, :width])[:, None, None])
        rope = core.rotary(positions[:, None], h.dtype)
        z = h
        for l, layer in enumerate(core.layers):
            z = layer(z, rope=rope, mask=mask, cache=ColumnSlot(slots[:, l], columns, width))
        core.layer_token_applications += B * N
        z = core.norm(z)
        gates[batch, passes] = core.early_exit_gate(z[:, 0]).squeeze(-1).float()
        if policy.kind == "threshold":
            cdf = torch.cumsum(exit_distribution(gates, T), -1)[batch, passes]
            exits = (cdf >= policy.value) | (passes == T - 1)
        else:
            exits = passes == (int(policy.value) if policy.kind == "fixed" else T - 1)
        h = z
        passes = passes + 1
        emit = exits & ~done
        if bool(emit.any()):
            rows = emit.nonzero().squeeze(-1)
            new = model.lm_head(z[rows, 0]).argmax(-1)
            result[rows, P + produced[rows]] = new
            produced[rows] += 1
            columns[rows] += 1
            positions[rows] += 1
            passes[rows] = 0
            h = h.index_copy(0, rows, core.embed_tokens(new)[:, None])
            done[rows] |= produced[rows] >= max_new_tokens
            if eos_token_id is not None:
                done[rows] |= new == eos_token_id
        passes = torch.where(done, 0, passes)  # finished rows idle at pass 0 (their results are unused)
        columns = torch.where(done, columns.clamp_max(P + max_new_tokens - 1), columns)

    if eos_token_id is not None:  # what follows a row's end of sequence is padding, as in generate()
        ended = torch.cumsum((result[:, P:] == eos_token_id).long(), -1) - (result[:, P:] == eos_token_id).long()
        result[:, P:] = torch.where(ended > 0, pad_token_id, result[:, P:])
    if streamer is not None:
        streamer.end()
    return result
