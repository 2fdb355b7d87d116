"""Export a training checkpoint (any ZeRO stage) to a Hugging Face folder in the Ouro format.

    python -m pretrain.export --checkpoint runs/smoke --output runs/smoke/hf [--dtype bfloat16]

--checkpoint takes a run folder (its newest complete checkpoint), a run's checkpoints/ folder, or
one global_stepN folder. The tokenizer the run trained with is copied beside the weights. A
non-empty --output is refused unless --overwrite is given; the folder is written aside
(OUTPUT.partial) and renamed into place when complete, so an old export is replaced only by a whole one.
"""

import argparse
import shutil
import sys
from pathlib import Path

import torch

from looplm import LoopLMForCausalLM

from runtime import checkpoint
from .config import ConfigError, config_from_dict
from .engine import model_config


def resolve(path: str | Path) -> Path:
    path = Path(path)
    if checkpoint.is_complete(path):
        return path
    for run_dir in (path, path.parent):
        found = checkpoint.find_resume(run_dir)
        if found is not None and found.parent.parent == run_dir:
            return found
    raise ConfigError(f"{path} holds no complete checkpoint (a global_stepN folder with "
                      f"{checkpoint.STATE_FILE}); pass a run folder or a checkpoint folder")


def consolidated_state_dict(ckpt: Path, zero_stage: int, tensor_parallel: int = 1, shapes: dict | None = None) -> dict:
    """fp32 weights from the shards (zero_to_fp32), or the single module file for ZeRO-0; with tensor
    parallelism, the module weights of every tensor-parallel rank joined (`shapes`: the full shapes)."""
    if tensor_parallel > 1:
        return join_tensor_parallel(ckpt, tensor_parallel, shapes)
    if zero_stage == 0:
        return torch.load(ckpt / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)


def join_tensor_parallel(ckpt: Path, size: int, shapes: dict) -> dict:
    """AutoTP shards (mp_rank_XX_model_states.pt, one per tensor-parallel rank) -> whole tensors: a
    shard whose dimension d is 1/size of the full one is joined along d in rank order (column-parallel
    projections along 0, row-parallel along 1); a replicated tensor is taken from rank 0. The module
    weights are the training dtype's (bf16 training: bf16 values)."""
    parts = [torch.load(ckpt / f"mp_rank_{r:02d}_model_states.pt", map_location="cpu", weights_only=False)["module"]
             for r in range(size)]
    whole = {}
    for key, full in shapes.items():
        shards = [p[key] for p in parts]
        if tuple(shards[0].shape) == tuple(full):
            whole[key] = shards[0]
            continue
        dims = [d for d in range(len(full)) if shards[0].shape[d] * size == full[d]]
        if len(dims) != 1:
            raise ConfigError(f"checkpoint {ckpt}: {key} has shards of shape {tuple(shards[0].shape)} that do not "
                              f"tile its full shape {tuple(full)} over {size} tensor-parallel ranks")
        whole[key] = torch.cat(shards, dim=dims[0])
    return whole


def export(ckpt_path, output, dtype: str = "float32", overwrite: bool = False) -> Path:
    output = Path(output)
    if output.exists() and (not output.is_dir() or any(output.iterdir())) and not overwrite:
        raise ConfigError(f"export output {output} already exists and is not empty; pass --overwrite to replace it "
                          "(the old folder stays until the new export is complete) or choose another --output")
    ckpt = resolve(ckpt_path)
    checkpoint.verify(ckpt)
    state = checkpoint.read_state(ckpt)
    cfg = config_from_dict(state["config"])
    config = model_config(cfg)
    config.objective = cfg.ouro.objective
    model = LoopLMForCausalLM(config)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    weights = consolidated_state_dict(ckpt, state["zero_stage"], state.get("tensor_parallel", 1), shapes)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise ConfigError(f"checkpoint {ckpt} does not match the model of its config: missing {missing[:5]}, "
                          f"unexpected {unexpected[:5]}")
    model = model.to(getattr(torch, dtype))
    partial = output.with_name(output.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)  # a leftover of an interrupted export
    model.save_pretrained(partial)
    tokenizer = Path(cfg.data.tokenizer) if cfg.data.tokenizer else Path(cfg.data.default_corpus_dir) / "tokenizer.model"
    if tokenizer.is_dir():
        for f in tokenizer.iterdir():
            if f.is_file() and "token" in f.name:
                shutil.copy(f, partial / f.name)
    elif tokenizer.exists():
        shutil.copy(tokenizer, partial / "tokenizer.model")
    old = output.with_name(output.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if output.is_dir():
        output.rename(old)
    elif output.exists():
        output.unlink()
    partial.rename(output)
    shutil.rmtree(old, ignore_errors=True)
    return output


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --output (once the new one is whole)")
    args = p.parse_args(argv)
    try:
        out = export(args.checkpoint, args.output, args.dtype, args.overwrite)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2)
    print(f"exported {resolve(args.checkpoint)} to {out}")


if __name__ == "__main__":
    main()
