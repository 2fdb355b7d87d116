"""LTPO: test-time optimisation of latent vectors with the model's weights untouched
(spec/memgen_ltpo_gnosis.md 2.2).

A Gaussian policy centred on the current latents H: sample H + eps, eps ~ N(0, sigma^2 I), score it,
and move H along the one-sample REINFORCE estimate lr * (R(H + eps) - R(H)) * eps / sigma^2 (the
reward of H itself is the baseline the spec recommends; the official code uses none); sigma decays
per step; the best latents ever scored are kept (the ones actually scored, not the post-update H).
Rows of a batch are independent problems. With `stop_at`, a row stops once its reward reaches it.

Rewards: `confidence` (the LTPO paper's token confidence) or a correctness head's probability
(Correctness-LTPO, see correctness.py).
"""

from dataclasses import dataclass

import torch

from .reasoner import forward_embeds


@dataclass
class LTPOConfig:
    lr: float = 0.03
    sigma: float = 0.1
    sigma_decay: float = 0.99
    steps: int = 10
    top_k: int = 10
    confidence: str = "neg_logprob"  # the paper's code; "probability" = mean top-k probability instead
    stop_at: float | None = None  # Correctness-LTPO: stop a row once its reward >= this (e.g. 0.95)


@dataclass
class LTPOResult:
    latents: torch.Tensor  # (B, N, d) best latents found
    reward: torch.Tensor  # (B,) their reward
    steps: torch.Tensor  # (B,) optimisation steps each row used
    initial_reward: torch.Tensor  # (B,)


def confidence(logits: torch.Tensor, top_k: int = 10, kind: str = "neg_logprob") -> torch.Tensor:
    """Confidence of next-token distributions, averaged over positions; logits (B, P, V) -> (B,).

    "neg_logprob" (the LTPO paper's code, DeepConf-style): the mean of -log p over the k most likely
    tokens (larger = sharper); "probability": the mean of the k largest probabilities."""
    logp = torch.log_softmax(logits.float(), -1).topk(top_k, dim=-1).values
    if kind == "probability":
        return logp.exp().mean(-1).mean(-1)
    if kind != "neg_logprob":
        raise ValueError(f"confidence kind {kind!r} is unknown; use neg_logprob or probability")
    return -logp.mean(-1).mean(-1)


@torch.no_grad()
def optimize(latents: torch.Tensor, reward_fn, cfg: LTPOConfig, generator: torch.Generator | None = None) -> LTPOResult:
    """latents (B, N, d) initial; reward_fn(latents (B, N, d)) -> (B,) rewards (higher is better)."""
    h = latents.detach().clone()
    r_h = reward_fn(h).float()
    best, best_r, initial = h.clone(), r_h.clone(), r_h.clone()
    active = torch.ones(h.shape[0], dtype=torch.bool, device=h.device)
    if cfg.stop_at is not None:
        active &= r_h < cfg.stop_at
    steps = torch.zeros(h.shape[0], dtype=torch.long, device=h.device)
    sigma = cfg.sigma
    for _ in range(cfg.steps):
        if not active.any():
            break
        eps = torch.randn(h.shape, generator=generator, device=h.device, dtype=torch.float32).to(h.dtype) * sigma
        r_a = reward_fn(h + eps).float()
        better = active & (r_a > best_r)
        best[better], best_r[better] = (h + eps)[better], r_a[better]
        step = (cfg.lr * (r_a - r_h) / sigma**2)[:, None, None].to(h.dtype) * eps
        h = torch.where(active[:, None, None], h + step, h)
        steps += active.long()
        r_new = reward_fn(h).float()
        r_h = torch.where(active, r_new, r_h)
        better = active & (r_h > best_r)
        best[better], best_r[better] = h[better], r_h[better]
        if cfg.stop_at is not None:
            active &= best_r < cfg.stop_at
        sigma *= cfg.sigma_decay
    return LTPOResult(best, best_r, steps, initial)


def confidence_reward(reasoner, embeds: torch.Tensor, mask: torch.Tensor, top_k: int = 10,
                      kind: str = "neg_logprob"):
    """reward_fn for LTPO: the confidence of the next-token distributions at the latent positions
    (appended after the prompt: embeds, mask as `reasoner.prompt_embeds` gives them); the last
    latent's distribution is that of the first answer token."""
    def reward(latents):
        seq = torch.cat([embeds, latents.to(embeds.dtype)], 1)
        full = torch.cat([mask, mask.new_ones(latents.shape[:2])], 1)
        logits = forward_embeds(reasoner, seq, full).logits
        return confidence(logits[:, -latents.shape[1]:], top_k, kind)
    return reward
