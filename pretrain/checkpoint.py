"""Pretraining checkpoints: DeepSpeed's sharded files (weights, optimizer, scheduler) saved and
committed through `runtime.checkpoint` (atomic commit, manifest, `latest`), and loaded back, through
DeepSpeed's universal format when the data-parallel size changed."""

import subprocess
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from runtime import checkpoint as common
from runtime.checkpoint import set_rng_state, verify


def save(engine, output_dir, step: int, state: dict, keep_last: int, before_commit=None) -> Path:
    """Collective: every rank calls it. Returns the checkpoint folder `global_step<step>`."""
    tag = f"global_step{step}"
    return common.save(output_dir, tag, step, state, keep_last,
                       lambda ckpt: engine.save_checkpoint(str(ckpt.parent), tag=tag, save_latest=False),
                       before_commit)


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
    verify(ckpt)
    folder = universal_folder(ckpt) if universal else ckpt
    groups = engine.optimizer.param_groups if engine.optimizer is not None else []
    hyper = [{k: v for k, v in g.items() if k not in ("params", "lr", "initial_lr")} for g in groups]
    path, _ = engine.load_checkpoint(str(folder.parent), tag=folder.name, load_optimizer_states=True,
                                     load_lr_scheduler_states=True)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {folder}")
    if universal:  # DeepSpeed's ZeRO-3 universal load (0.19) gives every param group the first group's
        # hyperparameters (weight decay on norms and biases) and one shared Adam `step` tensor, which each
        # group's update then advances (two groups: the step counts twice per step, the bias correction
        # drifts): restore each group's own hyperparameters and give each state its own step.
        for group, h in zip(groups, hyper):
            group.update(h)
        inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
        for state in getattr(inner, "state", {}).values():
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].clone()
    rng = ckpt / f"rng_rank{dist.get_rank()}.pt"
    if rng.exists():  # absent for ranks that did not exist in the saving run
        set_rng_state(torch.load(rng, weights_only=False))
