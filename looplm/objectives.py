"""Training objectives of LoopLM (spec/ouro.md section 2).

* `token_cross_entropy`: per-token CE of one pass's LM head, in chunks, recomputing the chunk's
  logits in backward, so a (B, S, V) logit tensor is never materialised (nor saved) in training.
* `stage1_loss`: sum_t p(t) CE_t - beta H(p), averaged over target tokens (paper Eq. 4).
* `fused_exit_ce`: the first term of stage I, sum_t p(t) CE_t, with its gradients with respect to the
  hidden states, the LM head and p computed chunk by chunk in the forward pass (the approach of
  Liger-Kernel's fused linear cross-entropy and Cut Cross-Entropy, summed over the passes), so that
  backward only scales stored gradients: no logits are kept and none are recomputed.
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


class _FusedExitCE(torch.autograd.Function):
    """loss = sum_{i,t} p[i, t] CE(h_t[i] @ W.T, y[i]) * scale; also returns CE (N, T), detached."""

    @staticmethod
    def forward(ctx, weight, p, targets, scale, chunk_size, *hiddens):
        n, passes = targets.numel(), len(hiddens)
        ce = torch.empty(n, passes, dtype=torch.float32, device=targets.device)
        weights = (p.detach().float() * scale).contiguous()  # dLoss/dCE, known before the loss
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if weight.requires_grad else None
        grad_h = [torch.empty_like(h) if h.requires_grad else None for h in hiddens]
        rows = torch.arange(min(chunk_size, n), device=targets.device)
        # One (chunk, V) fp32 block for every chunk (a fresh 200 MB tensor per chunk costs its page
        # faults on a CPU), plus one in the weights' dtype when that is not fp32.
        block = torch.empty(len(rows), weight.shape[0], dtype=torch.float32, device=weight.device)
        low = None if weight.dtype == torch.float32 else torch.empty_like(block, dtype=weight.dtype)
        for t, h in enumerate(hiddens):
            for start in range(0, n, chunk_size):
                end = min(start + chunk_size, n)
                hc, yc, r = h[start:end], targets[start:end], rows[:end - start]
                # The block, rewritten in place: logits -> exp(logits - max) -> gradient.
                logits = block[:end - start]
                if low is None:
                    torch.mm(hc, weight.t(), out=logits)
                else:
                    logits.copy_(torch.mm(hc, weight.t(), out=low[:end - start]))
                target_logit = logits[r, yc]
                peak = logits.amax(-1, keepdim=True)
                e = logits.sub_(peak).exp_()
                total = e.sum(-1, keepdim=True)
                ce[start:end, t] = (peak + total.log()).squeeze(1) - target_logit
                if grad_w is None and grad_h[t] is None:
                    continue
                w = weights[start:end, t, None]
                g = e.mul_(w / total)  # w * softmax
                g[r, yc] -= w.squeeze(1)  # w * (softmax - onehot)
                g = g if low is None else low[:end - start].copy_(g)
                if grad_h[t] is not None:
                    torch.mm(g, weight, out=grad_h[t][start:end])
                if grad_w is not None:
                    grad_w.addmm_(g.t() if low is None else g.t().float(), hc.float())
        ctx.save_for_backward(ce, grad_w if grad_w is not None else torch.empty(0),
                              *[g if g is not None else torch.empty(0) for g in grad_h])
        ctx.scale, ctx.has_w, ctx.has_h = scale, grad_w is not None, [g is not None for g in grad_h]
        ctx.weight_dtype, ctx.p_requires_grad = weight.dtype, p.requires_grad
        ctx.mark_non_differentiable(ce)
        return (p.detach().float() * ce).sum() * scale, ce

    @staticmethod
    def backward(ctx, grad_loss, grad_ce):
        ce, grad_w, *grad_h = ctx.saved_tensors
        gw = (grad_w * grad_loss).to(ctx.weight_dtype) if ctx.has_w else None
        gp = ce * (ctx.scale * grad_loss) if ctx.p_requires_grad else None
        gh = [g * grad_loss.to(g.dtype) if has else None for g, has in zip(grad_h, ctx.has_h)]
        return (gw, gp, None, None, None, *gh)


def fused_exit_ce(hiddens: list[torch.Tensor], weight: torch.Tensor, targets: torch.Tensor, p: torch.Tensor,
                  normalizer: float | torch.Tensor, chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """sum over target tokens and passes of p_t CE_t, divided by `normalizer`, and the per-token CE.

    hiddens: T tensors (B, S, d) (each pass's final-norm output); weight: (V, d) LM head; targets:
    (B, S) shifted, IGNORE_INDEX where ignored; p: (B, S, T) exit probabilities (gradients flow to them
    through dLoss/dp = CE / normalizer). Returns (loss, CE (B, S, T) fp32 with 0 at ignored positions,
    detached). Gradients equal autograd's of the plain formula; memory: one (chunk, V) fp32 block at a
    time plus the stored gradients (T x targets x d, and V x d fp32 for the head). The matmuls run in
    the LM head's dtype, also under autocast (hidden states in another dtype are cast to it first).
    """
    valid = targets != IGNORE_INDEX
    y = targets[valid]
    scale = 1.0 / (normalizer.float() if torch.is_tensor(normalizer) else float(normalizer))
    loss, ce = _FusedExitCE.apply(weight, p[valid], y, scale, chunk_size,
                                  *[h[valid].to(weight.dtype) for h in hiddens])
    full = torch.zeros(*targets.shape, len(hiddens), dtype=torch.float32, device=targets.device)
    full[valid] = ce
    return loss, full


def stage1_loss(step_ce: torch.Tensor | None, gate_logits: torch.Tensor, mask: torch.Tensor, beta: float,
                normalizer: float | torch.Tensor | None = None, expected_ce: torch.Tensor | None = None,
                exit_probs: torch.Tensor | None = None) -> torch.Tensor:
    """Entropy-regularised expected loss.

    step_ce: (B, S, T) per-token CE of each pass; gate_logits: (B, S, T); mask: (B, S) bool target
    positions. Returns sum over targets of [sum_t p_t CE_t - beta H(p)] divided by `normalizer`
    (default: the number of targets; pass the global count for exact gradient accumulation).
    expected_ce: the first term already summed and divided by the normalizer, as the fused kernel
    (`fused_exit_ce`) computes it with its gradients; step_ce is then not read. exit_probs: the exit
    distribution of gate_logits when already computed (the fused kernel's input), so that both terms'
    gradients reach the gate through the same node.
    """
    p = exit_distribution(gate_logits) if exit_probs is None else exit_probs
    normalizer = mask.sum().clamp_min(1) if normalizer is None else normalizer
    if expected_ce is None:
        expected_ce = ((p * step_ce).sum(-1) * mask).sum() / normalizer
    return expected_ce - beta * (exit_entropy(p) * mask).sum() / normalizer


def stage2_gate_loss(step_ce: torch.Tensor, gate_logits: torch.Tensor, mask: torch.Tensor,
                     k: float = 50.0, gamma: float = 0.005,
                     normalizer: float | torch.Tensor | None = None) -> torch.Tensor:
    """Adaptive gate loss: (1/T) sum_{t=2..T} mean_i BCE(1 - lambda_t, w_t), w_t = sigmoid(k (I_t - gamma)).

    step_ce: (B, S, T) per-token CE (detached here); gate_logits: (B, S, T) logits of lambda;
    mask: (B, S) bool target positions (the M positions averaged over). normalizer: as in
    stage1_loss (default: the number of targets here; the global count for exact accumulation).
    """
    ce = step_ce.detach().float()
    improvement = (ce[..., :-1] - ce[..., 1:]).clamp_min(0)
    w = torch.sigmoid(k * (improvement - gamma))
    g = gate_logits[..., 1:].float()
    # log(1 - lambda) = logsigmoid(-g), log(lambda) = logsigmoid(g)
    bce = -(w * F.logsigmoid(-g) + (1 - w) * F.logsigmoid(g))
    per_step = (bce * mask[..., None]).sum((0, 1)) / (mask.sum().clamp_min(1) if normalizer is None else normalizer)
    return per_step.sum() / gate_logits.shape[-1]
