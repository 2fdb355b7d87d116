"""Checkpoints of both training systems, committed atomically and verified before use.

Layout of `output_dir/checkpoints/`: one folder per save, named by its step (`global_stepN` for
pretraining, DeepSpeed's tag; `step_N` for post-training), holding what the trainer writes (DeepSpeed's
shards, or the post-training modules), `rng_rank{r}.pt` per rank, `manifest.json` listing every file
with its size and SHA-256 digest, and `trainer_state.json` written by rank 0 only after every rank
finished; and `latest` naming the newest complete one, replaced atomically last. A save killed
half-way has no trainer_state.json and `latest` still names the previous checkpoint, so it can never
be resumed from.

Before a checkpoint is loaded its manifest is verified, the files shared out over the ranks; any
missing, resized or changed file stops every rank with an error naming the checkpoint and the file.
A `latest` that names an unusable checkpoint stops the run too: it never falls back silently.
"""

import contextlib
import errno
import hashlib
import json
import os
import random
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from .config import ConfigError
from .distributed import is_rank0, shared_out

STATE_FILE = "trainer_state.json"
MANIFEST = "manifest.json"


class CheckpointError(ConfigError):
    """A checkpoint that cannot be resumed from: names it, the file, and what to do."""


def checkpoint_root(output_dir) -> Path:
    return Path(output_dir) / "checkpoints"


def is_complete(ckpt: Path) -> bool:
    return (ckpt / STATE_FILE).exists()


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def seed_globals(seed: int, rank: int) -> None:
    """Seed Python's and NumPy's global generators (per rank): unseeded, they start from OS entropy,
    so two runs of one config, or a run and its resumed twin, would save different RNG states."""
    random.seed(seed + rank)
    np.random.seed((seed + rank) % 2**32)


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def save(output_dir, tag: str, step: int, state: dict, keep_last: int, write, before_commit=None) -> Path:
    """Collective: every rank calls it. `write(folder)` writes this rank's part of the checkpoint
    (every rank is called; it may write nothing); then each rank's RNG state, the manifest, the
    trainer state (`state` + step) and `latest`, in that order, and the complete checkpoints beyond
    `keep_last` are removed. `before_commit` (fault injection) runs once every rank has written,
    before the manifest and the commit. Returns the checkpoint folder."""
    root = checkpoint_root(output_dir)
    ckpt = root / tag
    rank = dist.get_rank()
    if rank == 0 and ckpt.exists():  # a leftover of an interrupted save of this step
        shutil.rmtree(ckpt)
    dist.barrier()
    with _disk_full_is_an_error(ckpt, step):
        write(ckpt)
        ckpt.mkdir(parents=True, exist_ok=True)
        torch.save(rng_state(), ckpt / f"rng_rank{rank}.pt")
    dist.barrier()  # every rank's files are on disk
    if before_commit is not None:
        before_commit()
    with _disk_full_is_an_error(ckpt, step):
        write_manifest(ckpt)
        if rank == 0:
            _write_atomic(ckpt / STATE_FILE, json.dumps({**state, "step": step}, indent=2, sort_keys=True))
            _write_atomic(root / "latest", tag)
        complete = sorted((p for p in root.iterdir() if p.is_dir() and _step(p) >= 0 and is_complete(p)), key=_step)
        for old in complete[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return ckpt


FULL_BELOW = 64 << 20  # bytes free after a failed write below which the disk counts as full


@contextlib.contextmanager
def _disk_full_is_an_error(ckpt: Path, step: int):
    """A save that fails on a full disk (ENOSPC, or torch's and DeepSpeed's own messages for it, with
    the filesystem found nearly full) becomes one clear error: where, how much is free, that the
    partial checkpoint was removed and which checkpoint a resume takes. Other failures pass unchanged."""
    try:
        yield
    except Exception as err:
        chain, e = [], err
        while e is not None:
            chain.append(e)
            e = e.__cause__ or e.__context__
        root = ckpt.parent
        usage = shutil.disk_usage(root if root.exists() else root.parent)
        if not any(getattr(e, "errno", None) == errno.ENOSPC for e in chain) and usage.free >= FULL_BELOW:
            raise
        shutil.rmtree(ckpt, ignore_errors=True)  # the partial save (it was never committed)
        latest = root / "latest"
        resume = (f"`latest` still names {root / latest.read_text().strip()}, which a resume (train.resume=auto) "
                  "takes" if latest.exists() else "no checkpoint of this run is committed yet")
        raise CheckpointError(
            f"no space left on the filesystem of {root} while saving checkpoint {ckpt.name} (step {step}): "
            f"{usage.free / 2**20:.0f} MiB free of {usage.total / 2**20:.0f} MiB ({type(err).__name__}: "
            f"{str(err).strip().splitlines()[0][:200]}). The partial checkpoint was removed; {resume}. Free space "
            "(or lower train.keep_last, or set train.output_dir on a larger filesystem), then resume") from err


def _step(path: Path) -> int:
    """N of a checkpoint folder global_stepN (pretraining) or step_N (post-training); -1 otherwise."""
    match = re.fullmatch(r"(?:global_step|step_)(\d+)", path.name)
    return int(match.group(1)) if match else -1


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def find_resume(output_dir) -> Path | None:
    """The checkpoint `latest` names. A `latest` naming a missing or incomplete checkpoint is an
    error (never a silent fall-back to an older one); without `latest` (a run killed during its first
    save), the highest complete one, with a note."""
    root = checkpoint_root(output_dir)
    if (root / "latest").exists():
        return named_by_latest(root)
    complete = [p for p in root.glob("*") if p.is_dir() and is_complete(p) and _step(p) >= 0]
    if not complete:
        return None
    found = max(complete, key=_step)
    print(f"note: {root} has no `latest`; resuming from the highest complete checkpoint {found}", file=sys.stderr,
          flush=True)
    return found


def resolve_resume(resume: str, output_dir) -> Path | None:
    """The checkpoint config key train.resume asks for: auto (`find_resume`), none, or a folder that
    must be a complete checkpoint."""
    if resume == "auto":
        return find_resume(output_dir)
    if resume == "none":
        return None
    if not is_complete(Path(resume)):
        raise ConfigError(f"config key train.resume: {resume} is not a complete checkpoint (no {STATE_FILE})")
    return Path(resume)


def named_by_latest(root: Path) -> Path:
    """The checkpoint `root/latest` names (pretraining or post-training); a missing or incomplete one
    is an error that lists the complete checkpoints to resume instead."""
    latest = Path(root) / "latest"
    ckpt = latest.parent / latest.read_text().strip()
    if not is_complete(ckpt):
        raise CheckpointError(f"{latest} names {ckpt}, which is {'incomplete' if ckpt.is_dir() else 'missing'}; "
                              f"{_alternatives(ckpt)}")
    return ckpt


def read_state(ckpt: Path) -> dict:
    path = Path(ckpt) / STATE_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path} cannot be read ({err}): checkpoint {ckpt} is damaged; "
                              f"{_alternatives(Path(ckpt))}") from err


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(ckpt: Path) -> None:
    """Collective when distributed: every file of `ckpt` (but the manifest and the trainer state,
    written after it) with its size and digest, hashed in parallel; rank 0 writes manifest.json."""
    ckpt = Path(ckpt)
    files = sorted(str(p.relative_to(ckpt)) for p in ckpt.rglob("*")
                   if p.is_file() and p.name not in (MANIFEST, STATE_FILE) and not p.name.endswith(".tmp"))
    entries = shared_out(files, lambda f: {"bytes": (ckpt / f).stat().st_size, "sha256": _digest(ckpt / f)})
    if is_rank0():
        _write_atomic(ckpt / MANIFEST, json.dumps({"files": dict(sorted(entries.items()))}, indent=1))


def verify(ckpt: Path) -> None:
    """Collective when distributed: check every file against the manifest. Raises CheckpointError on
    every rank, naming the checkpoint and the first bad file. A checkpoint written before manifests
    existed is loaded with a warning."""
    ckpt = Path(ckpt)
    path = ckpt / MANIFEST
    if not path.exists():
        if is_rank0():
            print(f"warning: checkpoint {ckpt} has no {MANIFEST} (written by an older looplm): its files are not "
                  "verified", file=sys.stderr, flush=True)
        return
    try:
        files = json.loads(path.read_text())["files"]
    except (OSError, ValueError, KeyError) as err:
        raise CheckpointError(f"{path} cannot be read ({err}): checkpoint {ckpt} is damaged; "
                              f"{_alternatives(ckpt)}") from err

    def problem(name: str) -> str | None:
        f, want = ckpt / name, files[name]
        if not f.is_file():
            return "is missing"
        if f.stat().st_size != want["bytes"]:
            return f"has {f.stat().st_size} bytes, the manifest says {want['bytes']} (truncated or replaced)"
        return None if _digest(f) == want["sha256"] else "does not match its checksum (corrupted)"

    problems = {k: v for k, v in shared_out(sorted(files), problem).items() if v}
    if problems:
        name = sorted(problems)[0]
        more = f" ({len(problems) - 1} more bad files)" if len(problems) > 1 else ""
        err = CheckpointError(f"checkpoint {ckpt} is damaged: {ckpt / name} {problems[name]}{more}; "
                              f"{_alternatives(ckpt)}")
        err.on_every_rank = True  # every rank found it together: one of them says so
        raise err


def _alternatives(bad: Path) -> str:
    """The fix: resume another complete checkpoint of the run, listed."""
    others = [str(p) for p in sorted(bad.parent.glob("*"), key=_step)
              if p.is_dir() and p != bad and is_complete(p) and _step(p) >= 0]
    if not others:
        return "no other complete checkpoint exists in this run: start again (train.resume=none) or restore the files"
    return f"resume another complete checkpoint with train.resume=PATH: {', '.join(others)}"
