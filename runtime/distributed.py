"""Process groups for both training systems: start and leave them, share work out over the ranks,
and end a rank on an error so that the job's output names the cause once."""

import contextlib
import os
import sys
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

from .config import ConfigError
from .lock import release as release_output_locks


def init_distributed() -> tuple[int, int]:
    """Join the process group the DeepSpeed runner set up (or a group of one): (rank, world size)."""
    import deepspeed

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend=backend)
        release_shared_memory_names()
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    return dist.get_rank(), dist.get_world_size()


def release_shared_memory_names():
    """DeepSpeed's CPU all-reduce puts one /dev/shm segment per rank (about 66 MiB) under a name made
    of the master address and port, and never unlinks it, so every run used to leave them behind.
    When init returns, every rank has mapped all its peers' segments; after a barrier each rank
    unlinks its own name. The mappings stay valid and the memory goes back when the run ends, by a
    clean exit, an error, SIGTERM or SIGKILL alike."""
    dist.barrier()
    name = (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{dist.get_rank()}")
    (Path("/dev/shm") / name).unlink(missing_ok=True)


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


@contextlib.contextmanager
def rank_errors(input_errors: tuple = (ConfigError,)):
    """How a rank ends on an error, so that the job's output names the cause once:
    * bad input (config, data, checkpoint: `input_errors`): one line `error: ...`, exit 2; an error
      every rank found together (a damaged checkpoint) is printed by rank 0 alone;
    * a peer's failure seen through a collective (gloo/NCCL): one line saying so, exit 1, so the
      failing rank's own error is the one to read;
    * anything else: the traceback headed by the rank, exit 1.
    The DeepSpeed runner ends the other ranks once one exits non-zero."""
    rank = int(os.environ.get("RANK", "0"))
    where = f" (rank {rank})" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
    try:
        yield
    except input_errors as err:
        if rank == 0 or not getattr(err, "on_every_rank", False):
            print(f"error{where}: {err}", file=sys.stderr, flush=True)
        raise SystemExit(2)
    except Exception as err:
        if _peer_failure(err):
            print(f"rank {rank}: stopping: a peer rank failed (its error is printed above or below)",
                  file=sys.stderr, flush=True)
        else:
            print(f"error{where}: {type(err).__name__}: {err}", file=sys.stderr, flush=True)
            traceback.print_exc()
        sys.stderr.flush()
        release_output_locks()  # os._exit skips atexit
        os._exit(1)  # no teardown: the process group may wait on the dead peer


def _peer_failure(err: BaseException) -> bool:
    """An error raised by a collective because another rank went away."""
    dist_error = getattr(dist, "DistError", ())
    text = str(err)
    return isinstance(err, dist_error) or any(s in text for s in (
        "Connection closed by peer", "Connection reset by peer", "Broken pipe", "NCCL communicator was aborted",
        "Socket Timeout", "Timed out waiting"))


def shutdown_distributed(exit_process: bool = False):
    """Leave together: a rank that exits while a peer still tears down its communicator can make the
    peer abort (seen with gloo on CPU), so meet at a barrier and destroy the group first.
    exit_process (the commands' mains, once everything is written and closed): end the process here
    with status 0, skipping the interpreter's teardown, where communicator threads can still abort a
    finished job ("terminate called without an active exception", seen with torch 2.14 and DeepSpeed
    tensor parallelism on gloo: a completed run reported as failed)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    if exit_process:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
