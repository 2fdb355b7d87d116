"""Training objectives of LoopLM (spec/ouro.md section 2).

* `token_cross_entropy`: per-token CE of one pass's LM head, in chunks, recomputing the chunk's
  logits in backward, so a (B, S, V) logit tensor is never materialised (nor saved) in training.
* `stage1_loss`: sum_t p(t) CE_t - beta H(p), averaged over target tokens (paper Eq. 4).
* `stage2_gate_loss`: BCE of the continuation probability 1 - lambda_t against
  sigmoid(k (I_t - gamma)), I_t = max(0, CE_{t-1} - CE_t) detached (paper Eqs. 5-6).
"""

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .exits import exit_distribution, exit_entropy

IGNORE_INDEX = -100


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """Targets aligned with positions: position i predicts labels[i + 1] (HF convention); the last
    position has no target. (B, S) -> (B, S) with IGNORE_INDEX where there is nothing to predict."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def _chunk_ce(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(F.linear(hidden, weight).float(), targets, reduction="none")


def token_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                        chunk_size: int) -> torch.Tensor:
    """Per-token next-token CE of `hidden @ weight.T`, fp32.

    hidden: (B, S, d); weight: (V, d) LM head; targets: (B, S) already shifted, IGNORE_INDEX where
    ignored. Returns (B, S) fp32, 0 at ignored positions. Only target positions are computed, in
    chunks of `chunk_size` tokens; under autograd each chunk's logits are recomputed in backward.
    """
    valid = targets != IGNORE_INDEX
    out = hidden.new_zeros(targets.shape, dtype=torch.float32)
    h, y = hidden[valid], targets[valid]
    if y.numel() == 0:
        return out
    grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    pieces = []
    for start in range(0, y.numel(), chunk_size):
        hc, yc = h[start:start + chunk_size], y[start:start + chunk_size]
        pieces.append(checkpoint(_chunk_ce, hc, weight, yc, use_reentrant=False) if grad else _chunk_ce(hc, weight, yc))
    return out.masked_scatter(valid, torch.cat(pieces))


def stage1_loss(step_ce: torch.Tensor, gate_logits: torch.Tensor, mask: torch.Tensor, beta: float,
                normalizer: float | torch.Tensor | None = None) -> torch.Tensor:
    """Entropy-regularised expected loss.

    step_ce: (B, S, T) per-token CE of each pass; gate_logits: (B, S, T); mask: (B, S) bool target
    positions. Returns sum over targets of [sum_t p_t CE_t - beta H(p)] divided by `normalizer`
    (default: the number of targets; pass the global count for exact gradient accumulation).
    """
    p = exit_distribution(gate_logits)
    per_token = (p * step_ce).sum(-1) - beta * exit_entropy(p)
    total = (per_token * mask).sum()
    return total / (mask.sum().clamp_min(1) if normalizer is None else normalizer)


def stage2_gate_loss(step_ce: torch.Tensor, gate_logits: torch.Tensor, mask: torch.Tensor,
                     k: float = 50.0, gamma: float = 0.005) -> torch.Tensor:
    """Adaptive gate loss: (1/T) sum_{t=2..T} mean_i BCE(1 - lambda_t, w_t), w_t = sigmoid(k (I_t - gamma)).

    step_ce: (B, S, T) per-token CE (detached here); gate_logits: (B, S, T) logits of lambda;
    mask: (B, S) bool target positions (the M positions averaged over).
    """
    ce = step_ce.detach().float()
    improvement = (ce[..., :-1] - ce[..., 1:]).clamp_min(0)
    w = torch.sigmoid(k * (improvement - gamma))
    g = gate_logits[..., 1:].float()
    # log(1 - lambda) = logsigmoid(-g), log(lambda) = logsigmoid(g)
    bce = -(w * F.logsigmoid(-g) + (1 - w) * F.logsigmoid(g))
    per_step = (bce * mask[..., None]).sum((0, 1)) / mask.sum().clamp_min(1)
    return per_step.sum() / gate_logits.shape[-1]
