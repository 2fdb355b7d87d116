"""One job per output folder. Two jobs on one `output_dir` (a cluster job re-submitted while the old
one still runs) would write the same checkpoints and metrics; the second must stop at once.

Rank 0 of a job holds `output_dir/job.lock` from the start of training to its end: a file created
exclusively (O_EXCL), holding the job's host, pid, start time and command, and flock'ed while held.
It is removed on every exit path the process lives through (the end of the run, an error, SIGTERM,
and `rank_errors`' hard exit); only SIGKILL or a dead node leave it behind. A job that finds the file:

* held by a live process (the flock is taken, or the holder's pid runs on this host): stops with an
  error naming the folder and the holder;
* left by a dead job on this host (its pid gone): takes it over, saying so;
* left by a job on another host whose flock is free: stops with the way out (that job may still
  run on a filesystem without cluster-wide flock; if it is dead, delete the file), since a
  liveness check across hosts cannot be trusted on every filesystem.
"""

import atexit
import contextlib
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

import torch.distributed as dist

from .config import ConfigError

LOCK_FILE = "job.lock"
_held: dict[Path, int] = {}  # lock path -> open, flock'ed file descriptor


class OutputLockError(ConfigError):
    """The output folder belongs to another job."""


def _me() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "command": " ".join(sys.argv)}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _describe(holder: dict) -> str:
    return (f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, since {holder.get('started', '?')}"
            f" ({holder.get('command', '?')})")


def _flock_free(path: Path) -> bool:
    """Whether no process holds the file's flock (False when it is held)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError:  # a filesystem without flock: no evidence either way
        return True
    finally:
        os.close(fd)


def acquire(output_dir) -> Path:
    """Hold `output_dir` for this process (not collective; see `hold`). Returns the lock file."""
    folder = Path(output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_FILE
    if path.resolve() in _held:
        return path
    for _ in range(2):  # a second try after removing a dead job's lock
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                holder = json.loads(path.read_text() or "{}")
            except (OSError, ValueError):
                holder = {}
            same_host = holder.get("host") == socket.gethostname()
            pid = holder.get("pid")
            if not _flock_free(path) or (same_host and isinstance(pid, int) and _alive(pid)):
                raise OutputLockError(
                    f"train.output_dir {folder} is in use by another job ({_describe(holder)}): two jobs would "
                    "overwrite each other's checkpoints and metrics. Wait for it to end or stop it, or set "
                    "train.output_dir to another folder")
            if not same_host:
                raise OutputLockError(
                    f"train.output_dir {folder} holds the lock {path} of a job on another host ({_describe(holder)}) "
                    "that did not release it. If that job is no longer running (killed, node lost), delete "
                    f"{path} and start again; otherwise wait for it or set train.output_dir to another folder")
            print(f"warning: {path}: taking over the lock of a job that ended without releasing it "
                  f"({_describe(holder)}; process gone)", file=sys.stderr, flush=True)
            path.unlink(missing_ok=True)
            continue
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # before the holder is written: a reader never sees it free
        os.write(fd, json.dumps(_me()).encode())
        _held[path.resolve()] = fd
        _exit_cleanly_on_sigterm()
        return path
    raise OutputLockError(f"could not take the lock {path}: another job took it at the same time; "
                          "set train.output_dir to another folder")


def release(output_dir=None) -> None:
    """Give up the lock of `output_dir` (every lock this process holds when None). Idempotent."""
    paths = list(_held) if output_dir is None else [(Path(output_dir) / LOCK_FILE).resolve()]
    for path in paths:
        fd = _held.pop(path, None)
        if fd is None:
            continue
        path.unlink(missing_ok=True)  # removed before the flock is dropped: no window for a wrong "stale"
        os.close(fd)


atexit.register(release)


def _terminated(signum, frame):
    raise SystemExit(128 + signum)  # unwinds through atexit, which releases the lock


def _exit_cleanly_on_sigterm() -> None:
    """SIGTERM's default action skips atexit; until a trainer installs its own handler (preemption),
    make it an exit that releases the lock."""
    import signal
    import threading

    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _terminated)


@contextlib.contextmanager
def held(output_dir):
    """Collective: rank 0 holds the output folder's lock for the duration of the block and gives it up
    on every way out of it, errors included; when it cannot take it, every rank stops with its error
    (printed once)."""
    error = None
    if not dist.is_initialized() or dist.get_rank() == 0:
        try:
            acquire(output_dir)
        except OutputLockError as err:
            error = str(err)
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error:
        err = OutputLockError(error)
        err.on_every_rank = True
        raise err
    try:
        yield
    finally:
        release(output_dir)
