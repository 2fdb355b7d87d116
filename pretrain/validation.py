"""Validation during training: loss per pass on held-out data, and exact-match accuracy of the
synthetic tasks at every exit depth (plus the learned-gate exit). Collective: every rank calls it."""

import torch
import torch.distributed as dist

from looplm import left_pad
from looplm.objectives import IGNORE_INDEX

from .data.synthetic import exact_match, first_word


@torch.no_grad()
def validation_loss(model, loader_batches, device) -> list[float] | None:
    """Mean CE per pass over this rank's validation micro-batches, averaged over all targets of all ranks;
    None when no rank had a target to score (an empty or too small validation split)."""
    sums = None
    for batch in loader_batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        out = model(**batch, use_cache=False, compute_logits=False)
        n = (batch["labels"][:, 1:] != IGNORE_INDEX).sum()
        part = torch.cat([out.step_losses.double() * n, n.double()[None]])
        sums = part if sums is None else sums + part
    if sums is None:
        sums = torch.zeros(model.config.total_ut_steps + 1, dtype=torch.float64, device=device)
    dist.all_reduce(sums)
    return (sums[:-1] / sums[-1]).tolist() if sums[-1] > 0 else None


@torch.no_grad()
def greedy_answers(model, tokenizer, prompts: list[str], device, sync: bool = False, max_new_tokens: int = 4,
                   **policy) -> list[str]:
    """The first word of each prompt's greedy continuation (`max_new_tokens` tokens) under an exit
    policy (`exit_at_step`, `exit_threshold`, ...; none = the config's): the one scorer of the
    synthetic tasks, in training and in the experiment drivers."""
    ids, mask = left_pad([tokenizer.encode(p) for p in prompts])
    width = ids.shape[1]
    out = model.generate(ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                         min_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0, synced_gpus=sync, **policy)
    return [first_word(tokenizer.decode(row[width:].tolist())) for row in out]


@torch.no_grad()
def task_accuracy(model, tokenizer, tasks: dict, max_prompts: int, device, sync: bool,
                  rank: int | None = None, world: int | None = None) -> dict:
    """{"<task>@<pass>": accuracy} for a fixed exit pass 1..T, and "<task>@gate" for the config's
    learned-gate threshold. Prompts are split over ranks in equal shares (ZeRO-3 needs every rank to
    run the same forwards); answers are greedy, 4 new tokens, exact match on the first word.
    rank/world: the data-parallel split (default: every rank; the ranks of a tensor-parallel group
    share theirs, and the all-reduced counts hold each of their prompts once per rank, which cancels)."""
    rank = dist.get_rank() if rank is None else rank
    world = dist.get_world_size() if world is None else world
    T = model.config.total_ut_steps
    results = {}
    for task, items in sorted(tasks.items()):
        items = items[:max_prompts]
        share = -(-len(items) // world)
        mine = items[rank * share:(rank + 1) * share]
        valid = len(mine)
        mine = mine + [items[0]] * (share - valid)  # padding rows, not counted
        policies = [(str(t + 1), {"exit_at_step": t}) for t in range(T)] + [("gate", {})]
        for name, kw in policies:
            answers = greedy_answers(model, tokenizer, [p for p, _ in mine], device, sync, **kw)[:valid]
            correct = exact_match(answers, [a for _, a in mine[:valid]]) * valid
            counts = torch.tensor([correct, valid], dtype=torch.float64, device=device)
            dist.all_reduce(counts)
            results[f"{task}@{name}"] = (counts[0] / counts[1].clamp_min(1)).item()
    return results
