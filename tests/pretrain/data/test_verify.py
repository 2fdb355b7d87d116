"""Data verified on open: per-block checksums in the index, checked at the start of training (all
blocks of a small data set, a sample of a large one) and optionally on first read; a flipped bit or
a foreign .idx stops training with the file and block named; an older index opens with a warning."""

import hashlib
import json
import random
import shutil
import struct

import numpy as np
import pytest

from helpers.data import corpus, sp_tokenizer, write_jsonl
from helpers.training import base_overrides, run_in_process
from pretrain.data import DataError, IndexedDataset, ingest
from pretrain.data.indexed import MAGIC

BLOCK = 256  # bytes: small blocks, so that the test corpora span many


@pytest.fixture
def built(tmp_path):
    tok = sp_tokenizer(tmp_path)
    texts = corpus(300)
    ingest([str(write_jsonl(tmp_path / "docs.jsonl", texts))], tok, tmp_path / "ds", progress=False, block_bytes=BLOCK)
    return tmp_path / "ds", tok, texts


def flip(path, at):
    data = bytearray(path.read_bytes())
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


def test_block_digests_equal_an_independent_computation(built):
    prefix, _, _ = built
    ds = IndexedDataset(prefix)
    raw = prefix.with_suffix(".bin").read_bytes()
    expected = [hashlib.sha256(raw[i:i + BLOCK]).hexdigest() for i in range(0, len(raw), BLOCK)]
    assert ds.header["bin_blocks"] == expected and ds.header["block_bytes"] == BLOCK and len(expected) > 10
    ds.verify_blocks(range(len(expected)))


def test_block_choice_per_mode(built):
    ds = IndexedDataset(built[0])
    n = ds.num_blocks
    assert ds.choose_blocks("full", 4) == list(range(n)) and ds.choose_blocks("off", 4) == []
    sample = ds.choose_blocks("sample", 5, seed=3)
    assert len(sample) == 5 and {0, n - 1} <= set(sample) and sample == ds.choose_blocks("sample", 5, seed=3)
    assert ds.choose_blocks("sample", n + 10) == list(range(n))  # a small data set is checked whole


def test_a_flipped_bit_is_found_in_its_block(built):
    prefix, _, _ = built
    flip(prefix.with_suffix(".bin"), 5 * BLOCK + 17)
    ds = IndexedDataset(prefix)
    ds.verify_blocks([4, 6])  # the neighbours are fine
    with pytest.raises(DataError, match=r"ds\.bin block 5 .*checksum"):
        ds.verify_blocks([5])


def test_verify_on_read_checks_each_block_the_first_time_it_is_read(built):
    prefix, _, texts = built
    flip(prefix.with_suffix(".bin"), 7 * BLOCK + 3)
    ds = IndexedDataset(prefix, verify_on_read=True)
    doc_in_block7 = next(i for i in range(len(ds)) if ds.offsets[i] <= 7 * BLOCK + 3 < ds.offsets[i + 1])
    ds.doc(0)  # block 0 is fine
    with pytest.raises(DataError, match="block 7"):
        ds.doc(doc_in_block7)


def _training(corpus_dir, prefix, tmp_path, **extra):
    tokenizer = corpus_dir / "tokenizer.model"
    return base_overrides(corpus_dir, tmp_path / "run", **{"data.blend": f"'1.0 {prefix}'", "data.tokenizer": tokenizer,
                                                           "train.max_steps": 1, **extra})


@pytest.fixture
def corpus_copy(corpus, tmp_path):
    """The embedded corpus's indexed files (one 64 MiB block) in a folder of the test's own."""
    for suffix in (".bin", ".idx"):
        shutil.copy(corpus / f"train{suffix}", tmp_path / f"train{suffix}")
    return tmp_path / "train"


def test_training_refuses_a_flipped_bit_and_trains_with_verify_off(corpus, corpus_copy, tmp_path):
    flip(corpus_copy.with_suffix(".bin"), 1000)
    with pytest.raises(DataError, match=f"{corpus_copy}.bin block 0"):
        run_in_process(_training(corpus, corpus_copy, tmp_path))
    run_in_process(_training(corpus, corpus_copy, tmp_path, **{"data.verify": "off"}))  # the user's explicit choice


def test_training_refuses_a_bin_paired_with_a_foreign_idx(corpus, tmp_path):
    """The same documents ingested in another order: equal sizes, so only the checksums can tell."""
    texts = [json.loads(line)["text"] for line in (corpus / "train.jsonl").read_text().splitlines()]
    random.Random(0).shuffle(texts)
    ingest([str(write_jsonl(tmp_path / "shuffled.jsonl", texts))], corpus / "tokenizer.model", tmp_path / "other",
           progress=False)
    shutil.copy(corpus / "train.bin", tmp_path / "other.bin")  # the original .bin under the shuffled .idx
    assert (tmp_path / "other.bin").stat().st_size == (corpus / "train.bin").stat().st_size
    with pytest.raises(DataError, match="checksum"):
        run_in_process(_training(corpus, tmp_path / "other", tmp_path))


def test_an_index_without_block_checksums_opens_with_a_warning(corpus, corpus_copy, tmp_path, capsys):
    idx = corpus_copy.with_suffix(".idx")
    raw = idx.read_bytes()
    (size,) = struct.unpack("<Q", raw[8:16])
    header = json.loads(raw[16:16 + size])
    for key in ("bin_blocks", "block_bytes"):
        del header[key]
    header["version"] = 1
    blob = json.dumps(header, sort_keys=True).encode()
    idx.write_bytes(MAGIC + struct.pack("<Q", len(blob)) + blob + raw[16 + size:])
    assert IndexedDataset(corpus_copy).num_blocks is None
    run_in_process(_training(corpus, corpus_copy, tmp_path))
    err = capsys.readouterr().err
    assert "has no block checksums" in err and "--overwrite" in err
    np.testing.assert_array_equal(IndexedDataset(corpus_copy).doc(3), IndexedDataset(corpus / "train").doc(3))
