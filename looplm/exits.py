"""Exit gate math (spec/ouro.md 1.4, 3.1): exit distribution, entropy and the inference exit policies.

All of it runs in fp32: in bf16 a saturated sigmoid rounds the survival to 0 and fakes an exit.
"""

from dataclasses import dataclass

import torch


def exit_distribution(gate_logits: torch.Tensor, num_steps: int | None = None) -> torch.Tensor:
    """Per-token exit pmf p(t) from gate logits.

    gate_logits: (..., n) raw logits of the n passes run so far. num_steps: the total number of
    passes T (default n). p_t = lambda_t * S_{t-1} for t < T-1 and p_{T-1} = S_{T-2}: the last pass
    absorbs the remaining mass and its own gate is unused. Returns (..., n) fp32; sums to 1 when n == T.
    """
    n = gate_logits.shape[-1]
    num_steps = n if num_steps is None else num_steps
    lam = torch.sigmoid(gate_logits.float())
    survival = torch.cumprod(1.0 - lam, dim=-1)
    survival_before = torch.cat([torch.ones_like(survival[..., :1]), survival[..., :-1]], dim=-1)
    p = lam * survival_before
    if n == num_steps:
        p = torch.cat([p[..., :-1], survival_before[..., -1:]], dim=-1)
    return p


def exit_entropy(p: torch.Tensor) -> torch.Tensor:
    """H(p) = -sum_t p_t log p_t over the last dim (fp32, 0 log 0 = 0)."""
    p = p.float()
    return -(p * torch.log(p.clamp_min(torch.finfo(p.dtype).tiny))).sum(-1)


@dataclass(frozen=True)
class ExitPolicy:
    """How a token picks the pass whose output it emits.

    kind: "last" (pass T-1), "fixed" (pass `step`), "threshold" (first pass whose exit CDF >= q),
    "hidden_diff" (first pass t >= 1 with ||h_t - h_{t-1}||_2 < epsilon), "weighted" (the exit-pmf
    mixture of all passes; needs every pass, so it never skips compute).
    """

    kind: str = "last"
    value: float | int | None = None

    @property
    def is_online(self) -> bool:
        """True when a token's exit is known right after its exit pass, so later passes can be skipped."""
        return self.kind in ("fixed", "threshold", "hidden_diff")


def resolve_exit_policy(config, exit_at_step=None, exit_threshold=None, exit_hidden_diff=None,
                        use_weighted_exit=False) -> ExitPolicy:
    """Per-call arguments first, then the config; the official priority order otherwise
    (fixed step, then threshold, then weighted, then last)."""
    if exit_at_step is not None:
        return ExitPolicy("fixed", int(exit_at_step))
    if exit_hidden_diff is not None:
        return ExitPolicy("hidden_diff", float(exit_hidden_diff))
    if exit_threshold is not None:
        return ExitPolicy("threshold", float(exit_threshold))
    if use_weighted_exit:
        return ExitPolicy("weighted")
    if getattr(config, "early_exit_step", None) is not None:
        return ExitPolicy("fixed", int(config.early_exit_step))
    if getattr(config, "early_exit_hidden_diff", None) is not None:
        return ExitPolicy("hidden_diff", float(config.early_exit_hidden_diff))
    if config.early_exit_threshold is not None:
        return ExitPolicy("threshold", float(config.early_exit_threshold))
    return ExitPolicy("last")


def select_exit_steps(policy: ExitPolicy, gate_logits: torch.Tensor, hiddens: list[torch.Tensor],
                      num_steps: int) -> torch.Tensor:
    """Exit pass per token (B, S) int64, from the n <= num_steps passes run so far.

    A token whose rule has not fired within the n passes gets num_steps - 1 (so `steps <= t` after
    pass t tells exactly which tokens have exited; the decision never changes as passes are added).
    """
    shape = gate_logits.shape[:-1]
    last = torch.full(shape, num_steps - 1, dtype=torch.long, device=gate_logits.device)
    n = gate_logits.shape[-1]
    if policy.kind == "fixed":
        step = int(policy.value)
        if not 0 <= step < num_steps:
            raise ValueError(f"exit_at_step={step} is outside 0..{num_steps - 1}; pick a pass that runs")
        return torch.full_like(last, step)
    if policy.kind == "threshold":
        fired = torch.cumsum(exit_distribution(gate_logits, num_steps), dim=-1) >= policy.value
    elif policy.kind == "hidden_diff":
        if n < 2:
            return last
        diffs = torch.stack([(hiddens[t].float() - hiddens[t - 1].float()).norm(dim=-1) for t in range(1, n)], -1)
        fired = torch.cat([torch.zeros_like(diffs[..., :1], dtype=torch.bool), diffs < policy.value], dim=-1)
    else:
        return last
    first = torch.where(fired.any(-1), fired.float().argmax(-1), last)
    return torch.minimum(first, last)
