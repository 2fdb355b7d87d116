"""Running the trainer from tests: in this process (world size 1) or under the real deepspeed runner."""

import json
import os
import subprocess
from pathlib import Path

import torch

from runtime.launch import deepspeed_command as deepspeed_cmd, free_port  # noqa: F401 (used by the tests)

REPO = Path(__file__).resolve().parents[2]


def base_overrides(corpus: Path, out: Path, **extra) -> list[str]:
    """A tiny, fast run on the embedded corpus (fp32, CPU)."""
    values = {
        "model.overrides": "{vocab_size: 256, hidden_size: 64, intermediate_size: 128, num_hidden_layers: 2, "
                           "num_attention_heads: 4, num_key_value_heads: 2, head_dim: 16, total_ut_steps: 3}",
        "data.default_corpus_dir": str(corpus), "data.seq_len": 32, "data.valid_fraction": 0.02,
        "train.global_batch": 8, "train.micro_batch": 2, "train.bf16": False, "train.log_every": 1,
        "train.save_every": 1000, "train.eval_every": 0, "train.eval_batches": 1, "train.eval_max_prompts": 0,
        "train.output_dir": str(out), "optim.warmup_steps": 2, "optim.lr": 0.003, "train.spike_factor": 0,
        "ouro.beta_schedule": "[]",
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


def init_single_process():
    from runtime.distributed import init_distributed

    if not torch.distributed.is_initialized():
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))
    return init_distributed()


def run_in_process(overrides: list[str]):
    from pretrain.config import load_config
    from pretrain.train import run

    init_single_process()
    return run(load_config(REPO / "configs/smoke.yaml", overrides), 0, 1)


def launch(world: int, overrides: list[str], timeout: int = 300, script: str = "launch/pretrain.sh",
           check: bool = True) -> subprocess.CompletedProcess:
    """`deepspeed --num_gpus W launch/pretrain.sh --config configs/smoke.yaml OVERRIDES` from the repo root."""
    cmd = deepspeed_cmd(world) + [script, "--config", "configs/smoke.yaml", *overrides]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def step_losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in metrics(run_dir) if "loss" in r}


def checkpoint_weights(ckpt: Path) -> dict:
    from runtime.checkpoint import read_state
    from pretrain.export import consolidated_state_dict

    return consolidated_state_dict(Path(ckpt), read_state(ckpt)["zero_stage"])


def single_and_parallel_runs(root: Path, cases: dict, overrides, parallel: dict, world: int = 2) -> None:
    """For each case (name -> extra overrides): `single_NAME` in this process and `par_NAME` with the
    `parallel` keys on `world` ranks, all parallel runs in one deepspeed job (tests/helpers/multi_run.py)."""
    for name, extra in cases.items():
        run_in_process(overrides(root / f"single_{name}", **extra))
    spec = root / "runs.json"
    spec.write_text(json.dumps([overrides(root / f"par_{name}", **extra, **parallel) for name, extra in cases.items()]))
    cmd = deepspeed_cmd(world) + ["tests/helpers/multi_run.py", "--config", "configs/smoke.yaml", "--runs", str(spec)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def flatten(tree: dict, prefix: str = "") -> dict:
    """A nested config dict as {"a.b.c": value}: to compare configs key by key."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
