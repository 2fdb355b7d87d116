"""Intervals for experiment tables: a percentile bootstrap over seeds and problems, paired when two rows
were scored on the same problems."""

import torch


def seed_problem_interval(a, b=None, level: float = 0.95, resamples: int = 2000, seed: int = 0,
                          clusters=None) -> dict:
    """Mean of `a` (or of the paired difference a - b) and its bootstrap interval.

    a, b: (seeds, problems) per-problem scores (0/1 correctness, or any real value) of independently
    trained seeds on the same problems. Each resample draws seeds with replacement and, independently,
    problems with replacement, the same draws for a and b (paired: problem difficulty and the pairing
    of seed i with seed i cancel in the difference). clusters: one id per problem (e.g. its solution):
    problems that share an id are not independent, so whole clusters are drawn with replacement
    (a cluster bootstrap) instead of problems. Returns {"diff" (or "mean"), "ci95", "n_seeds",
    "n_problems"} (+ "n_clusters")."""
    x = torch.as_tensor(a, dtype=torch.float64)
    if b is not None:
        y = torch.as_tensor(b, dtype=torch.float64)
        if x.shape != y.shape:
            raise ValueError(f"paired rows must have the same seeds x problems; got {tuple(x.shape)} and {tuple(y.shape)}")
        x = x - y
    if x.dim() != 2 or x.numel() == 0:
        raise ValueError(f"expected a non-empty (seeds, problems) array, got shape {tuple(x.shape)}")
    seeds, problems = x.shape
    g = torch.Generator().manual_seed(seed)
    extra = {}
    if clusters is None:
        pick_problems = torch.randint(problems, (resamples, problems), generator=g)
        per_seed = x[:, pick_problems].mean(-1)  # (seeds, resamples): each seed on each problem resample
    else:
        if len(clusters) != problems:
            raise ValueError(f"clusters: {len(clusters)} ids for {problems} problems; give one id per problem")
        ids = {c: i for i, c in enumerate(dict.fromkeys(clusters))}
        member = torch.tensor([ids[c] for c in clusters])
        drawn = torch.randint(len(ids), (resamples, len(ids)), generator=g)
        counts = torch.zeros(resamples, len(ids), dtype=torch.float64).scatter_add_(
            1, drawn, torch.ones(resamples, len(ids), dtype=torch.float64))
        weights = counts[:, member]  # (resamples, problems): how often each problem's cluster was drawn
        per_seed = (x @ weights.t()) / weights.sum(-1)
        extra = {"n_clusters": len(ids)}
    pick_seeds = torch.randint(seeds, (resamples, seeds), generator=g)
    means = per_seed.gather(0, pick_seeds.t()).mean(0)
    lo, hi = torch.quantile(means, torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)).tolist()
    return {"diff" if b is not None else "mean": x.mean().item(), "ci95": [lo, hi], "n_seeds": seeds,
            "n_problems": problems, **extra}
