"""Memory per GPU of a pretraining run, estimated before it starts (printed by the trainer at start;
or `python -m pretrain.memory --config CONFIG --world-size W [overrides]`).

Model states (exact counts, from the model built on the meta device): weights and gradients in the
training dtype, AdamW's two moments in fp32 plus the fp32 master weights when training in bf16;
ZeRO-1 shards the optimizer state, ZeRO-2 also the gradients, ZeRO-3 also the weights over the
ranks that hold replicas (data- x sequence-parallel); tensor parallelism splits the shared layers'
projections (not the embedding, head, norms and gate).

Activations (an estimate, bytes kept for backward per token): a looped model keeps every (pass,
layer) application's activations, T x N of them. Per application and token, in the training dtype:
the sandwich layer's 4 norm inputs and outputs and 2 residual sums (12 d), q, k, v before and after
RoPE (2 (q + 2 kv)), the attention output (q), the MLP's gate, up, activation and product (4 f; none
with `train.tiled_mlp`);
tensor parallelism divides the projection terms. With activation checkpointing only each
application's input (d) is kept, plus one application's full set during its recomputation. Plus per
pass the final-norm hidden state and, for the fused loss, its stored gradient (fp32), and one chunk
of fp32 logits and their gradient. Sequence parallelism divides every per-token term by its size.
Not counted: framework buffers, fragmentation, communication buckets (budget ~10-20% on top).
"""

import argparse
import sys
from dataclasses import dataclass

import torch

GIB = 2**30


@dataclass
class MemoryEstimate:
    parameters: int
    weights: float  # bytes per GPU
    gradients: float
    optimizer: float
    activations: float
    logits: float

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations + self.logits

    def lines(self) -> list[str]:
        parts = [("weights", self.weights), ("gradients", self.gradients), ("optimizer", self.optimizer),
                 ("activations", self.activations), ("loss chunk", self.logits)]
        return [f"memory estimate per GPU: {self.total / GIB:.1f} GiB (" +
                ", ".join(f"{name} {value / GIB:.2f}" for name, value in parts) +
                f"; {self.parameters:,} parameters; + framework buffers)"]


def parameter_counts(model_config) -> tuple[int, int]:
    """(all parameters, those of the shared layers' projections that tensor parallelism splits)."""
    from looplm import LoopLMForCausalLM

    with torch.device("meta"):
        model = LoopLMForCausalLM(model_config)
    total = sum(p.numel() for p in model.parameters())
    split = sum(p.numel() for n, p in model.named_parameters() if n.endswith("proj.weight"))
    return total, split


def estimate(cfg, model_config, world_size: int) -> MemoryEstimate:
    t, c = cfg.train, model_config
    sp, tp = t.sequence_parallel, t.tensor_parallel
    replicas = world_size // tp  # ranks holding a copy of the same (tensor-parallel shard of the) weights
    total, split = parameter_counts(c)
    local = total - split + split / tp  # parameters of this rank's tensor-parallel shard
    dtype = 2 if t.bf16 else 4
    weights = local * dtype / (replicas if t.zero_stage >= 3 else 1)
    gradients = local * dtype / (replicas if t.zero_stage >= 2 else 1)
    optimizer = local * (12 if t.bf16 else 8) / (replicas if t.zero_stage >= 1 else 1)

    tokens = t.micro_batch * cfg.data.seq_len / sp  # per rank per micro-batch
    d, f = c.hidden_size, c.intermediate_size
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    mlp = 4 * f if t.tiled_mlp == 1 else 0  # TiledMLP keeps no MLP intermediates (recomputed per tile)
    per_application = (12 * d + (2 * (q + 2 * kv) + q + mlp) / tp) * dtype
    applications = c.total_ut_steps * c.num_hidden_layers
    if t.activation_checkpointing:
        layers = (applications * d * dtype + per_application) * tokens
    else:
        layers = applications * per_application * tokens
    per_pass = c.total_ut_steps * tokens * d * (dtype + 4)  # final-norm states + their stored fp32 gradients
    chunk = min(c.ce_chunk_size, tokens)
    logits = 2 * chunk * c.vocab_size * 4
    return MemoryEstimate(total, weights, gradients, optimizer, layers + per_pass, logits)


def main(argv=None):
    from .config import load_config, validate
    from .engine import model_config

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--world-size", type=int, required=True, help="GPUs of the job (nodes x GPUs per node)")
    p.add_argument("overrides", nargs="*", help="section.key=value")
    args = p.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    validate(cfg, args.world_size)
    print("\n".join(estimate(cfg, model_config(cfg), args.world_size).lines()))


if __name__ == "__main__":
    sys.exit(main())
