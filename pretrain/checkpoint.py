"""Checkpoints: DeepSpeed's sharded files plus the trainer state, committed atomically.

Layout of `output_dir/checkpoints/`: one `global_stepN/` per save (DeepSpeed's shards, `rng_rank{r}.pt`
per rank, and `trainer_state.json` written by rank 0 only after every rank finished), and `latest`
naming the newest complete one, replaced atomically last. A save killed half-way has no
trainer_state.json and `latest` still names the previous checkpoint, so it can never be resumed from.
"""

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

STATE_FILE = "trainer_state.json"


def checkpoint_root(output_dir) -> Path:
    return Path(output_dir) / "checkpoints"


def is_complete(ckpt: Path) -> bool:
    return (ckpt / STATE_FILE).exists()


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def save(engine, output_dir, step: int, state: dict, keep_last: int) -> Path:
    """Collective: every rank calls it. Returns the checkpoint folder."""
    root = checkpoint_root(output_dir)
    tag = f"global_step{step}"
    ckpt = root / tag
    rank = dist.get_rank()
    if rank == 0 and ckpt.exists():  # a leftover of an interrupted save of this step
        shutil.rmtree(ckpt)
    dist.barrier()
    engine.save_checkpoint(str(root), tag=tag, save_latest=False)
    torch.save(rng_state(), ckpt / f"rng_rank{rank}.pt")
    dist.barrier()  # every shard is on disk
    if rank == 0:
        _write_atomic(ckpt / STATE_FILE, json.dumps({**state, "step": step}, indent=2, sort_keys=True))
        _write_atomic(root / "latest", tag)
        complete = sorted((p for p in root.glob("global_step*") if p.is_dir() and is_complete(p)), key=_step)
        for old in complete[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return ckpt


def _step(path: Path) -> int:
    try:
        return int(path.name.removeprefix("global_step").split("_")[0])
    except ValueError:
        return -1


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def find_resume(output_dir) -> Path | None:
    """The newest complete checkpoint of a run: the one `latest` names if complete, else the
    highest complete global_stepN (an interrupted save is skipped)."""
    root = checkpoint_root(output_dir)
    latest = root / "latest"
    if latest.exists() and is_complete(root / latest.read_text().strip()):
        return root / latest.read_text().strip()
    complete = [p for p in root.glob("global_step*") if p.is_dir() and is_complete(p) and _step(p) >= 0]
    return max(complete, key=_step) if complete else None


def read_state(ckpt: Path) -> dict:
    return json.loads((Path(ckpt) / STATE_FILE).read_text())


def universal_folder(ckpt: Path) -> Path:
    """Convert a ZeRO checkpoint for another data-parallel size (once, on rank 0); returns its folder."""
    target = ckpt.with_name(ckpt.name + "_universal")
    if dist.get_rank() == 0 and not (target / "zero").exists():
        subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(ckpt),
                        "--output_folder", str(target), "--inject_missing_state"], check=True,
                       stdout=subprocess.DEVNULL)
    dist.barrier()
    return target


def load(engine, ckpt: Path, universal: bool) -> None:
    """Restore engine (weights, optimizer, scheduler) and this rank's RNG from a checkpoint."""
    ckpt = Path(ckpt)
    folder = universal_folder(ckpt) if universal else ckpt
    path, _ = engine.load_checkpoint(str(folder.parent), tag=folder.name, load_optimizer_states=True,
                                     load_lr_scheduler_states=True)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {folder}")
    rng = ckpt / f"rng_rank{dist.get_rank()}.pt"
    if rng.exists():  # absent for ranks that did not exist in the saving run
        set_rng_state(torch.load(rng, weights_only=False))
