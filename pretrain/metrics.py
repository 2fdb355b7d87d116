"""What a run reports: model FLOPs and MFU, the loss guard, and the console / JSONL / wandb sinks."""

import json
import math
import sys
import time
from collections import deque
from pathlib import Path


def flops_per_token(config, seq_len: int) -> float:
    """Training model FLOPs per token (forward + backward = 3 x forward), counting T passes.

    Per pass: 2 x (the N layers' matmul weights + the LM head, which is read after every pass) FLOPs
    for the dense products, plus causal attention scores and values, 2 x 2 x N x (S/2) x H x h.
    Activation-checkpointing recomputation is not counted (model FLOPs, as MFU is defined).
    """
    d, f, n = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    q = config.num_attention_heads * config.head_dim
    kv = config.num_key_value_heads * config.head_dim
    layer = d * q + 2 * d * kv + q * d + 3 * d * f
    dense = n * layer + d * config.vocab_size + d  # + exit gate
    attention = 2 * n * seq_len * q  # 2 products x (S/2 keys on average) x 2 FLOPs
    return 3 * config.total_ut_steps * (2 * dense + attention)


class LossGuard:
    """Flags a step whose loss is not finite, or above `factor` x the mean of the last `window` good
    losses; counts consecutive bad steps. Its state goes into the checkpoint."""

    def __init__(self, factor: float, window: int, max_bad: int, recent=(), bad_in_a_row: int = 0):
        self.factor, self.max_bad = factor, max_bad
        self.recent = deque(recent, maxlen=window)
        self.bad_in_a_row = bad_in_a_row

    def check(self, loss: float) -> str | None:
        """None if the step is good (and remember it), else the reason it is bad."""
        if not math.isfinite(loss):
            reason = f"non-finite loss {loss}"
        elif self.factor and len(self.recent) == self.recent.maxlen and loss > self.factor * (
                sum(self.recent) / len(self.recent)):
            reason = f"loss spike {loss:.4f} > {self.factor} x recent mean {sum(self.recent) / len(self.recent):.4f}"
        else:
            self.recent.append(loss)
            self.bad_in_a_row = 0
            return None
        self.bad_in_a_row += 1
        return reason

    def state(self) -> dict:
        return {"recent": list(self.recent), "bad_in_a_row": self.bad_in_a_row}


class MetricsLogger:
    """Rank 0 writes console lines and `metrics.jsonl` always, and wandb when enabled (offline by
    default; a wandb failure is reported once and never stops training)."""

    def __init__(self, output_dir, cfg, enabled: bool, resume_step: int = 0):
        self.enabled = enabled
        self.wandb = None
        if not enabled:
            return
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        self.file = open(Path(output_dir) / "metrics.jsonl", "a")
        if cfg.logging.wandb and cfg.logging.wandb_mode != "disabled":
            try:
                import wandb

                self.wandb = wandb.init(project=cfg.logging.wandb_project, name=cfg.logging.run_name,
                                        mode=cfg.logging.wandb_mode, dir=str(output_dir), config=cfg.to_dict(),
                                        resume="allow", id=(cfg.logging.run_name or Path(output_dir).name))
            except Exception as err:  # never let logging kill a run
                print(f"warning: wandb disabled ({err})", file=sys.stderr)

    def log(self, record: dict, console: str | None = None) -> None:
        if not self.enabled:
            return
        record = {"time": time.time(), **record}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if console:
            print(console, flush=True)
        if self.wandb is not None:
            flat = {k: v for k, v in record.items() if isinstance(v, (int, float))}
            for key in ("loss_per_pass", "exit_probs", "gate_mean", "valid_loss_per_pass"):
                for t, v in enumerate(record.get(key) or []):
                    flat[f"{key}/{t}"] = v
            for key, value in (record.get("accuracy") or {}).items():
                flat[f"accuracy/{key}"] = value
            self.wandb.log(flat, step=record.get("step"))

    def close(self):
        if self.enabled:
            self.file.close()
            if self.wandb is not None:
                self.wandb.finish()
