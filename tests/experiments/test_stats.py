"""The seeds x problems bootstrap: exact on constant data, paired differences cancel what two rows
share, and the interval narrows with more problems and covers the mean."""

import pytest
import torch

from experiments.stats import seed_problem_interval


def test_a_constant_difference_gives_a_zero_width_interval():
    a = [[1.0, 0.5, 0.75, 1.0]] * 3
    got = seed_problem_interval(a, [[x - 0.25 for x in row] for row in a])
    assert got == {"diff": 0.25, "ci95": [0.25, 0.25], "n_seeds": 3, "n_problems": 4}


def test_pairing_cancels_the_shared_problem_difficulty():
    g = torch.Generator().manual_seed(0)
    difficulty = torch.rand(1, 400, generator=g).expand(3, 400)
    noise = 0.01 * torch.randn(3, 400, generator=g)
    a, b = difficulty + 0.1 + noise, difficulty
    paired = seed_problem_interval(a, b)
    unpaired_width = 2 * 1.96 * (a.mean(0).var() / 400 + b.mean(0).var() / 400).sqrt().item()
    lo, hi = paired["ci95"]
    assert lo < 0.1 < hi and hi - lo < unpaired_width / 10


def test_interval_covers_the_mean_and_narrows_with_more_problems():
    g = torch.Generator().manual_seed(1)
    widths = []
    for n in (100, 1600):
        x = (torch.rand(3, n, generator=g) < 0.6).double()
        got = seed_problem_interval(x)
        lo, hi = got["ci95"]
        assert got["mean"] == pytest.approx(x.mean().item()) and lo <= got["mean"] <= hi
        widths.append(hi - lo)
    assert widths[1] < widths[0] / 2.5  # about 1 / sqrt(16) = 1/4


def test_seed_spread_widens_the_interval():
    same = torch.tensor([[1.0, 0.0] * 50] * 3)
    spread = same + torch.tensor([[-0.2], [0.0], [0.2]])
    assert (seed_problem_interval(spread)["ci95"][1] - seed_problem_interval(spread)["ci95"][0]
            > seed_problem_interval(same)["ci95"][1] - seed_problem_interval(same)["ci95"][0])


def test_clustered_problems_count_as_their_clusters():
    """30 copies of each of 10 problems: the cluster bootstrap gives the interval of the 10 problems
    scored once each (the same resampling law), the naive one an interval about sqrt(30) too narrow."""
    g = torch.Generator().manual_seed(2)
    values = (torch.rand(1, 10, generator=g) < 0.5).double()
    copies = values.repeat_interleave(30, 1)
    clusters = [i // 30 for i in range(300)]
    clustered = seed_problem_interval(copies, clusters=clusters, resamples=20000)
    once = seed_problem_interval(values, resamples=20000)
    naive = seed_problem_interval(copies, resamples=20000)
    width = lambda r: r["ci95"][1] - r["ci95"][0]  # noqa: E731
    assert clustered["mean"] == pytest.approx(values.mean().item()) and clustered["n_clusters"] == 10
    assert width(clustered) == pytest.approx(width(once), rel=0.15)
    assert width(naive) < width(clustered) / 3
    # singleton clusters are the plain problem bootstrap in law: the same width within resampling noise
    x = (torch.rand(2, 200, generator=g) < 0.6).double()
    assert width(seed_problem_interval(x, clusters=list(range(200)), resamples=20000)) == pytest.approx(
        width(seed_problem_interval(x, resamples=20000)), rel=0.1)
    with pytest.raises(ValueError, match="one id per problem"):
        seed_problem_interval(x, clusters=[0, 1])


@pytest.mark.parametrize("a,b", [([[1, 0]], [[1, 0, 1]]), ([1, 0, 1], None), ([[]], None)])
def test_bad_shapes_are_named(a, b):
    with pytest.raises(ValueError, match="seeds|paired"):
        seed_problem_interval(a, b)


@pytest.mark.parametrize("peak,lower", [(3e-4, False), (8e-3, True), (2e-3, False)])
def test_lr_grid_is_extended_until_it_brackets_the_best(peak, lower):
    import math

    from experiments.ouro_synthetic import bracketed_lr

    def score(lr):  # a smooth optimum in log-LR at `peak`
        d = (math.log(lr) - math.log(peak)) ** 2
        return d if lower else -d

    got = bracketed_lr(score, (1e-3, 2e-3, 4e-3), max_extensions=3, lower_is_better=lower)
    grid = sorted(float(k) for k in got["lr_grid"])
    best = min(grid, key=lambda lr: abs(math.log(lr / peak)))
    assert got["best_lr"] == pytest.approx(best) and got["bracketed"]
    assert grid[0] < got["best_lr"] < grid[-1]


def test_lr_grid_stops_after_its_extensions_and_says_so():
    from experiments.ouro_synthetic import bracketed_lr

    got = bracketed_lr(lambda lr: -lr, (1e-3, 2e-3), max_extensions=1)
    assert got == {"lr_grid": {"0.0005": -5e-4, "0.001": -1e-3, "0.002": -2e-3}, "best_lr": 5e-4, "bracketed": False}
