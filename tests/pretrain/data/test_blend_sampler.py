"""Blending realises its weights; the sampler shards without overlap and resumes exactly."""

import numpy as np
import pytest

from pretrain.data import BlendedDataset, DataError, RankBatchSampler, blend_assignment, parse_blend


def brute_force_blend(weights, n):
    """Merge of all datasets' ideal positions (k + 0.5) / w_d, ties by dataset id."""
    w = np.asarray(weights, float) / sum(weights)
    keys = sorted(((k + 0.5) / w[d], d, k) for d in range(len(w)) for k in range(int(n * w[d]) + 3))
    return [(d, k) for _, d, k in keys[:n]]


@pytest.mark.parametrize("weights", [[1], [0.7, 0.3], [0.5, 0.25, 0.25], [0.01, 0.9, 0.09], [3, 1, 1, 1, 5]])
def test_blend_assignment_is_the_merge_by_ideal_position(weights):
    expected = brute_force_blend(weights, 3000)
    for start, count in ((0, 3000), (1234, 500), (2999, 1)):
        d, k = blend_assignment(np.asarray(weights) / sum(weights), start, count)
        assert list(zip(d.tolist(), k.tolist())) == expected[start:start + count]


def test_realised_mixture_matches_the_weights_over_a_long_run():
    w = np.array([0.6, 0.3, 0.1])
    d, k = blend_assignment(w, 0, 200_000)
    counts = np.zeros(3)
    for n in range(1, 200_001, 997):  # every prefix holds n * w_d samples of d to within 1
        counts = np.bincount(d[:n], minlength=3)
        assert np.abs(counts - n * w).max() <= 1.0
    assert np.abs(np.bincount(d, minlength=3) / len(d) - w).max() < 1e-4
    for ds in range(3):  # each dataset's samples are taken in order, none skipped
        assert np.array_equal(k[d == ds], np.arange((d == ds).sum()))


class Numbers:
    def __init__(self, name, n):
        self.name, self.n = name, n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return (self.name, i)


def test_blend_stop_and_wrap():
    stop = BlendedDataset([Numbers("a", 10), Numbers("b", 100)], [0.5, 0.5], on_exhaust="stop")
    seen = [stop[g] for g in range(len(stop))]
    assert sorted(i for name, i in seen if name == "a") == list(range(10))
    assert len(stop) < 22
    with pytest.raises(IndexError):
        stop[len(stop)]
    wrap = BlendedDataset([Numbers("a", 10), Numbers("b", 100)], [0.5, 0.5])
    assert wrap[1000][1] > 10  # keeps going: index 10+ means the dataset's later epochs


@pytest.mark.parametrize("spec,expected", [
    ("0.7 a 0.3 b", [(0.7, "a"), (0.3, "b")]),
    (["c"], [(1.0, "c")]),
    ([{"weight": 2, "path": "x"}, {"weight": 1, "path": "y"}], [(2.0, "x"), (1.0, "y")]),
])
def test_parse_blend(spec, expected):
    assert parse_blend(spec) == expected


@pytest.mark.parametrize("spec", ["0.7 a 0.3", "a 0.7", [{"path": "x"}]])
def test_parse_blend_errors(spec):
    with pytest.raises(DataError):
        parse_blend(spec)


def run(world, steps, consumed=0, global_batch=8, micro=2, length=None):
    """Samples seen per step by all ranks together."""
    seen = []
    iters = [iter(RankBatchSampler(global_batch, micro, r, world, consumed, length)) for r in range(world)]
    per_rank_batches = global_batch // (micro * world)
    for _ in range(steps):
        step = [i for it in iters for _ in range(per_rank_batches) for i in next(it)]
        seen.append(sorted(step))
    return seen


@pytest.mark.parametrize("world", [1, 2, 4])
def test_every_sample_once_per_epoch_across_ranks(world):
    seen = [i for step in run(world, 5, length=40) for i in step]
    assert sorted(seen) == list(range(40))
    samplers = [RankBatchSampler(8, 2, r, world, length=40) for r in range(world)]
    per_rank = [[i for b in s for i in b] for s in samplers]
    assert sum(len(p) for p in per_rank) == 40 and len(set().union(*map(set, per_rank))) == 40


@pytest.mark.parametrize("resume_world", [1, 2, 4])
def test_resume_mid_epoch_on_another_world_size_continues_exactly(resume_world):
    uninterrupted = run(2, 10)
    first = run(2, 4)
    consumed = 4 * 8  # the state saved in the checkpoint
    rest = run(resume_world, 6, consumed=consumed)
    assert first + rest == uninterrupted
    flat = [i for step in first + rest for i in step]
    assert len(flat) == len(set(flat)) == 80


def test_inconsistent_batch_settings_are_refused():
    with pytest.raises(DataError, match="not a multiple"):
        RankBatchSampler(10, 4, 0, 2)
