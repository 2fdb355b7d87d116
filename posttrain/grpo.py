"""GRPO pieces (spec/memgen_ltpo_gnosis.md 1.4): group-normalised advantages and the clipped
policy-gradient loss with an optional KL penalty to a reference policy."""

import torch


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-4, scale: bool = True) -> torch.Tensor:
    """(r - mean of its group) / (std of its group + eps); rewards (N,) in groups of `group_size`
    consecutive entries; std with Bessel's correction, as TRL computes it. scale=False keeps the
    reward's units (r - group mean): where a small shaping term (a cost per action) is all that
    differs within most groups, dividing by the std would blow it up to the size of a correct answer."""
    groups = rewards.view(-1, group_size).float()
    adv = groups - groups.mean(1, keepdim=True)
    return (adv / (groups.std(1, keepdim=True) + eps) if scale else adv).flatten()


def mixed_groups(rewards: torch.Tensor, group_size: int) -> float:
    """The fraction of groups whose rewards differ: the only ones with a nonzero advantage (a group
    whose answers are all right or all wrong teaches GRPO nothing)."""
    groups = rewards.view(-1, group_size)
    return (groups != groups[:, :1]).any(1).float().mean().item()


def grpo_loss(logp: torch.Tensor, logp_old: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
              clip_eps: float = 0.2, kl_beta: float = 0.0, logp_ref: torch.Tensor | None = None) -> torch.Tensor:
    """Token-level clipped surrogate, summed over all completion tokens of the batch and divided by
    their number ("bnpo"). logp, logp_old, logp_ref, mask: (N, T); advantages: (N,)."""
    ratio = torch.exp(logp - logp_old)
    adv = advantages[:, None]
    per_token = -torch.minimum(ratio * adv, ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv)
    if kl_beta:
        diff = logp_ref - logp
        per_token = per_token + kl_beta * (torch.exp(diff) - diff - 1)  # k3 estimator of KL(pi || ref)
    mask = mask.float()
    return (per_token * mask).sum() / mask.sum().clamp_min(1)
