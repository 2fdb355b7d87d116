"""Ingestion writes exactly the tokenizer's output, deterministically, and refuses bad input cleanly."""

import json

import numpy as np
import pytest

from helpers.data import corpus, hf_tokenizer, sp_tokenizer, write_jsonl
from pretrain.data import DataError, IndexedDataset, IndexedWriter, Tokenizer, ingest
from pretrain.data.ingest import main as ingest_main


@pytest.mark.parametrize("kind", ["sentencepiece", "huggingface"])
@pytest.mark.parametrize("workers", [1, 2])
def test_tokens_written_equal_the_tokenizer_output(tmp_path, kind, workers):
    tok_path = sp_tokenizer(tmp_path) if kind == "sentencepiece" else hf_tokenizer(tmp_path)
    texts = corpus(50)
    texts[7] = ""  # an empty document: counted, not stored
    src = write_jsonl(tmp_path / "docs.jsonl", texts)
    header = ingest([str(src)], tok_path, tmp_path / "out", workers=workers, batch_size=8, progress=False)
    tok = Tokenizer(tok_path)
    ds = IndexedDataset(tmp_path / "out")
    expected = [tok.encode(t) + [tok.eos_id] for t in texts if t]
    assert header["empty_documents"] == 1 and len(ds) == len(expected) == 49
    for i, ids in enumerate(expected):
        assert ds.doc(i).tolist() == ids
    assert ds.dtype == np.uint8 and ds.header["tokenizer"] == tok.identity
    ds.verify()


def test_reruns_are_byte_identical_whatever_the_worker_count(tmp_path):
    tok = sp_tokenizer(tmp_path)
    src = write_jsonl(tmp_path / "docs.jsonl", corpus(80))
    outputs = []
    for i, workers in enumerate((1, 2, 1)):
        ingest([str(src)], tok, tmp_path / f"run{i}", workers=workers, batch_size=7, progress=False)
        outputs.append(((tmp_path / f"run{i}.bin").read_bytes(), (tmp_path / f"run{i}.idx").read_bytes()))
    assert outputs[0] == outputs[1] == outputs[2]


def test_folders_txt_and_parquet_inputs(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    tok_path = sp_tokenizer(tmp_path)
    tok = Tokenizer(tok_path)
    texts = corpus(20)
    (tmp_path / "txt").mkdir()
    (tmp_path / "txt" / "a.txt").write_text("\n".join(texts[:10]) + "\n")
    (tmp_path / "txt" / "b.txt").write_text("\n".join(texts[10:]) + "\n")
    pq.write_table(pa.table({"body": texts}), tmp_path / "docs.parquet")
    ingest([str(tmp_path / "txt")], tok_path, tmp_path / "from_txt", progress=False)
    ingest([str(tmp_path / "docs.parquet")], tok_path, tmp_path / "from_parquet", text_field="body", progress=False)
    for prefix in ("from_txt", "from_parquet"):
        ds = IndexedDataset(tmp_path / prefix)
        assert [ds.doc(i).tolist() for i in range(len(ds))] == [tok.encode(t) + [tok.eos_id] for t in texts]


def test_larger_vocabularies_use_wider_dtypes(tmp_path):
    for vocab, dtype in ((256, np.uint8), (257, np.uint16), (65536, np.uint16), (65537, np.uint32)):
        w = IndexedWriter(tmp_path / f"v{vocab}", vocab, {"kind": "test"})
        w.add([0, vocab - 1])
        w.finish()
        ds = IndexedDataset(tmp_path / f"v{vocab}")
        assert ds.dtype == dtype and ds.doc(0).tolist() == [0, vocab - 1]


def _cli_fails(tmp_path, capsys, inputs, match, **kw):
    tok = sp_tokenizer(tmp_path)
    args = ["--input", *inputs, "--tokenizer", str(kw.get("tokenizer", tok)), "--output", str(tmp_path / "out")]
    args += ["--text-field", kw.get("field", "text")]
    with pytest.raises(SystemExit) as exit_info:
        ingest_main(args)
    assert exit_info.value.code == 1
    assert match in capsys.readouterr().err
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith("out")]
    assert leftovers == [], f"partial output left behind: {leftovers}"


def test_missing_input_file(tmp_path, capsys):
    _cli_fails(tmp_path, capsys, [str(tmp_path / "nope.jsonl")], "does not exist")


def test_empty_input_file(tmp_path, capsys):
    (tmp_path / "empty.jsonl").write_text("")
    _cli_fails(tmp_path, capsys, [str(tmp_path / "empty.jsonl")], "empty")


def test_only_empty_documents(tmp_path, capsys):
    write_jsonl(tmp_path / "blank.jsonl", ["", ""])
    _cli_fails(tmp_path, capsys, [str(tmp_path / "blank.jsonl")], "no non-empty document")


def test_malformed_json_line_names_the_file(tmp_path, capsys):
    (tmp_path / "bad.jsonl").write_text('{"text": "alpha"}\n{"text": broken\n')
    _cli_fails(tmp_path, capsys, [str(tmp_path / "bad.jsonl")], "bad.jsonl")


def test_wrong_text_field_lists_the_fields(tmp_path, capsys):
    write_jsonl(tmp_path / "docs.jsonl", ["alpha"], field="content")
    _cli_fails(tmp_path, capsys, [str(tmp_path / "docs.jsonl")], "'content'")


def test_non_text_document(tmp_path, capsys):
    (tmp_path / "num.jsonl").write_text(json.dumps({"text": 42}) + "\n")
    _cli_fails(tmp_path, capsys, [str(tmp_path / "num.jsonl")], "not text")


def test_undecodable_text_file(tmp_path, capsys):
    (tmp_path / "bad.txt").write_bytes(b"alpha beta\n\xff\xfe gamma\n")
    _cli_fails(tmp_path, capsys, [str(tmp_path / "bad.txt")], "bad.txt")


def test_missing_tokenizer(tmp_path, capsys):
    write_jsonl(tmp_path / "docs.jsonl", ["alpha"])
    _cli_fails(tmp_path, capsys, [str(tmp_path / "docs.jsonl")], "tokenizer", tokenizer=tmp_path / "none.model")


def test_token_ids_outside_the_vocabulary_abort_without_output(tmp_path):
    w = IndexedWriter(tmp_path / "v", 10, {"kind": "test"})
    with pytest.raises(DataError, match="outside the vocabulary"):
        w.add([1, 2, 10])
    w.abort()
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def built(tmp_path):
    tok = sp_tokenizer(tmp_path)
    ingest([str(write_jsonl(tmp_path / "docs.jsonl", corpus(30)))], tok, tmp_path / "ds", progress=False)
    return tmp_path / "ds", tok


def test_tokenizer_and_vocab_mismatch(built, tmp_path):
    prefix, _ = built
    ds = IndexedDataset(prefix)
    with pytest.raises(DataError, match="tokenizer"):
        ds.check_tokenizer(Tokenizer(hf_tokenizer(tmp_path)).identity)
    with pytest.raises(DataError, match="vocab_size=50"):
        ds.check_vocab(50)
    ds.check_vocab(ds.vocab_size)


@pytest.mark.parametrize("damage,match,on_open", [
    ("truncate_bin", "truncated", True),
    ("truncate_idx", "truncated", True),
    ("bad_magic", "magic", True),
    ("flip_bin", "checksum", False),
    ("missing_idx", "does not exist", True),
])
def test_damaged_files_are_detected(built, damage, match, on_open):
    prefix, _ = built
    bin_path, idx_path = prefix.with_suffix(".bin"), prefix.with_suffix(".idx")
    if damage == "truncate_bin":
        bin_path.write_bytes(bin_path.read_bytes()[:-3])
    elif damage == "truncate_idx":
        idx_path.write_bytes(idx_path.read_bytes()[:-5])
    elif damage == "bad_magic":
        idx_path.write_bytes(b"XXXXXXXX" + idx_path.read_bytes()[8:])
    elif damage == "flip_bin":
        data = bytearray(bin_path.read_bytes())
        data[len(data) // 2] ^= 0x5
        bin_path.write_bytes(bytes(data))
    else:
        idx_path.unlink()
    with pytest.raises(DataError, match=match):
        IndexedDataset(prefix).verify() if not on_open else IndexedDataset(prefix)


def test_an_existing_output_is_refused_and_replaced_only_with_overwrite(tmp_path, capsys):
    tok = sp_tokenizer(tmp_path)
    first, second = write_jsonl(tmp_path / "a.jsonl", corpus(20)), write_jsonl(tmp_path / "b.jsonl", corpus(35))
    ingest([str(first)], tok, tmp_path / "out", progress=False)
    before = [(tmp_path / f"out.{s}").read_bytes() for s in ("bin", "idx")]
    with pytest.raises(SystemExit) as exit_info:
        ingest_main(["--input", str(second), "--tokenizer", str(tok), "--output", str(tmp_path / "out")])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "out.bin" in err and "--overwrite" in err
    assert [(tmp_path / f"out.{s}").read_bytes() for s in ("bin", "idx")] == before  # untouched
    ingest_main(["--input", str(second), "--tokenizer", str(tok), "--output", str(tmp_path / "out"), "--overwrite"])
    assert len(IndexedDataset(tmp_path / "out")) == 35
    assert sorted(p.name for p in tmp_path.glob("out*")) == ["out.bin", "out.idx"]  # no temporary left
