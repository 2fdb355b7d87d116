"""Work shared out over the ranks: each rank does its part of a list, every rank gets all results."""

import torch.distributed as dist


def shared_out(items: list, fn) -> dict:
    """{item: fn(item)}, the items dealt out over the ranks (when distributed) and gathered on all."""
    if not (dist.is_available() and dist.is_initialized()):
        return {item: fn(item) for item in items}
    rank, world = dist.get_rank(), dist.get_world_size()
    mine = {item: fn(item) for item in items[rank::world]}
    parts = [None] * world
    dist.all_gather_object(parts, mine)
    return {k: v for part in parts for k, v in part.items()}


def is_rank0() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
