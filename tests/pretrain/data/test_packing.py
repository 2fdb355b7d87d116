"""Packing: samples are the shuffled document stream cut into L tokens, with document boundaries."""

import numpy as np
import pytest
import torch

from helpers.models import tiny_model
from pretrain.data import DataError, IndexedDataset, IndexedWriter, PackedDataset, split_documents


@pytest.fixture
def indexed(tmp_path):
    rng = np.random.default_rng(0)
    w = IndexedWriter(tmp_path / "docs", 256, {"kind": "test"})
    for i in range(40):
        w.add(list(rng.integers(1, 255, rng.integers(1, 30))) + [255])
    w.finish()
    return IndexedDataset(tmp_path / "docs")


def test_an_epoch_is_the_shuffled_document_stream_cut_into_samples(indexed):
    ds = PackedDataset(indexed, seq_len=16, seed=3)
    order, ends, sample_order = ds._epoch(0)
    stream = np.concatenate([indexed.doc(int(d)) for d in order])
    assert sorted(order.tolist()) == list(range(40))  # every document once
    doc_start = np.zeros(len(stream), bool)
    doc_start[np.concatenate([[0], ends[:-1]])] = True
    for j in range(len(ds)):
        s = int(sample_order[j]) * 16
        sample = ds[j]
        assert np.array_equal(sample["input_ids"], stream[s:s + 16])
        starts = sample["position_ids"] == 0
        expected_starts = doc_start[s:s + 16].copy()
        expected_starts[0] = True  # a sample starting mid-document restarts its positions too
        assert np.array_equal(starts, expected_starts)
        assert np.array_equal(sample["labels"], np.where(starts, -100, sample["input_ids"]))
        for i in range(1, 16):  # positions count up inside a document
            assert starts[i] or sample["position_ids"][i] == sample["position_ids"][i - 1] + 1
    assert sorted(sample_order.tolist()) == list(range(len(ds)))


def test_later_epochs_reshuffle_and_stop_mode_ends(indexed):
    ds = PackedDataset(indexed, seq_len=16, seed=3)
    n = len(ds)
    assert not np.array_equal(ds._epoch(1)[0], ds._epoch(0)[0])
    twin = PackedDataset(IndexedDataset(indexed.bin_path.with_suffix("")), seq_len=16, seed=3)  # built independently
    for i in (0, n - 1, n + 2, 2 * n + 5):  # deterministic across instances and epochs
        for key in ("input_ids", "labels", "position_ids"):
            assert np.array_equal(ds[i][key], twin[i][key])
    other = PackedDataset(indexed, seq_len=16, seed=4)
    assert not all(np.array_equal(ds[i]["input_ids"], other[i]["input_ids"]) for i in range(n))  # the seed matters
    with pytest.raises(IndexError):
        PackedDataset(indexed, seq_len=16, seed=3, wrap=False)[n]


def test_train_and_valid_splits_partition_the_documents(indexed):
    train = split_documents(1000, 0.1, seed=5, split="train")
    valid = split_documents(1000, 0.1, seed=5, split="valid")
    assert len(set(train) & set(valid)) == 0 and len(train) + len(valid) == 1000
    assert 50 < len(valid) < 150
    assert np.array_equal(valid, split_documents(1000, 0.1, seed=5, split="valid"))
    ds = PackedDataset(indexed, 8, valid_fraction=0.25, split="valid")
    assert set(ds.docs) == set(split_documents(40, 0.25, 0, "valid"))
    with pytest.raises(DataError, match="fewer than seq_len"):
        PackedDataset(indexed, 10_000)


@torch.no_grad()
def test_a_packed_sample_runs_like_its_documents_run_separately(indexed):
    model = tiny_model()
    sample = PackedDataset(indexed, seq_len=48, seed=1)[0]
    ids = torch.from_numpy(sample["input_ids"])[None]
    pos = torch.from_numpy(sample["position_ids"])[None]
    packed = model(ids, position_ids=pos, use_cache=False, output_step_logits=True)
    starts = (pos[0] == 0).nonzero().flatten().tolist() + [48]
    assert len(starts) > 2
    for a, b in zip(starts[:-1], starts[1:]):
        alone = model(ids[:, a:b], use_cache=False, output_step_logits=True)
        for t in range(4):
            torch.testing.assert_close(packed.step_logits[t][:, a:b], alone.step_logits[t], atol=1e-4, rtol=1e-4)
