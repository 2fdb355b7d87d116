"""Ingestion: documents from `datasets` sources -> tokenized in worker processes -> PREFIX.bin/.idx.

    python -m pretrain.data ingest --input data/*.jsonl --tokenizer TOK --output data/train [--workers 4]

Inputs: local .json/.jsonl/.parquet/.txt files, folders of them (one file type per folder), or a hub
dataset name where a network exists. Files are read one at a time in streaming mode, so memory
stays bounded; documents are tokenized in batches by a pool of workers with a bounded number of
batches in flight, in order, so the output does not depend on the number of workers. Each document
gets the tokenizer's EOS appended. Empty documents are counted and reported. Any bad input stops
the run with an error naming it, and no .idx (the "finished" marker) is written.
"""

import argparse
import glob
import itertools
import multiprocessing as mp
from collections import deque
from pathlib import Path

from tqdm import tqdm

from runtime.cli import cli_main

from .errors import DataError
from .indexed import BLOCK_BYTES, IndexedWriter, paths
from .tokenizer import Tokenizer

BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".txt": "text"}


def expand_inputs(inputs: list[str]) -> list[tuple[str, str | None]]:
    """(source, builder) pairs: builder is a `datasets` loader for local files, None for a hub name."""
    sources = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.suffix in BUILDERS)
            if not files:
                raise DataError(f"input folder {path} has no {'/'.join(BUILDERS)} files")
            if len({BUILDERS[p.suffix] for p in files}) > 1:
                raise DataError(f"input folder {path} mixes file types; ingest each type separately")
            sources += [(str(p), BUILDERS[p.suffix]) for p in files]
        elif path.exists():
            if path.suffix not in BUILDERS:
                raise DataError(f"input {path}: unsupported file type {path.suffix!r}; use one of {sorted(BUILDERS)}")
            sources.append((str(path), BUILDERS[path.suffix]))
        elif glob.has_magic(item):
            matches = sorted(glob.glob(item))
            if not matches:
                raise DataError(f"input pattern {item} matches no file")
            sources += expand_inputs(matches)
        elif "/" in item and not item.startswith((".", "/")) and len(item.split("/")) == 2:
            sources.append((item, None))  # owner/name on the hub
        else:
            raise DataError(f"input {item} does not exist (and is not a hub dataset name owner/name)")
    return sources


def read_documents(source: str, builder: str | None, text_field: str, split: str = "train"):
    """Yield (location, text) for each record of one source, streaming."""
    import datasets

    datasets.disable_progress_bars()
    try:
        if builder is None:
            ds = datasets.load_dataset(source, split=split, streaming=True)
        else:
            ds = datasets.load_dataset(builder, data_files=source, split="train", streaming=True)
        for n, record in enumerate(ds):
            if text_field not in record:
                raise DataError(f"{source} record {n}: no field {text_field!r} (fields: {sorted(record)}); "
                                "pass --text-field")
            text = record[text_field]
            if not isinstance(text, str):
                raise DataError(f"{source} record {n}: field {text_field!r} is {type(text).__name__}, not text")
            yield f"{source} record {n}", text
    except DataError:
        raise
    except Exception as err:  # datasets/pyarrow/json raise many types for unreadable input
        if builder is not None and Path(source).stat().st_size == 0:
            raise DataError(f"{source} is empty") from err
        raise DataError(f"{source} could not be read as {builder or 'a hub dataset'}: {err}") from err


_worker_tokenizer = None


def _init_worker(tokenizer_path):
    global _worker_tokenizer
    _worker_tokenizer = Tokenizer(tokenizer_path)


def _tokenize_batch(texts):
    return [_worker_tokenizer.encode(t) + [_worker_tokenizer.eos_id] if t else [] for t in texts]


def _batches(docs, size):
    docs = iter(docs)
    while batch := list(itertools.islice(docs, size)):
        yield batch


def ingest(inputs: list[str], tokenizer: str | Path, output: str | Path, text_field: str = "text",
           workers: int = 1, batch_size: int = 256, progress: bool = True, overwrite: bool = False,
           block_bytes: int = BLOCK_BYTES) -> dict:
    """Tokenize every document of `inputs` into output.bin/.idx. Returns the index header. An existing
    output is refused unless `overwrite`; then it is replaced only once the new files are complete."""
    existing = [p for p in paths(output) if p.exists()]
    if existing and not overwrite:
        raise DataError(f"{' and '.join(map(str, existing))} already exist; pass --overwrite to replace them (the "
                        "old files stay until the new ones are complete) or choose another --output")
    tok = Tokenizer(tokenizer)
    sources = expand_inputs(inputs)
    docs = (doc for source, builder in sources for doc in read_documents(source, builder, text_field))
    writer = IndexedWriter(output, tok.vocab_size, tok.identity, block_bytes)
    bar = tqdm(desc=f"ingest {Path(output).name}", unit="doc", disable=not progress)
    pool = mp.get_context("spawn").Pool(workers, _init_worker, (str(tokenizer),)) if workers > 1 else None
    if pool is None:
        _init_worker(str(tokenizer))
    try:
        pending = deque()
        for batch in _batches(docs, batch_size):
            texts = [text for _, text in batch]
            pending.append(pool.apply_async(_tokenize_batch, (texts,)) if pool else _tokenize_batch(texts))
            while len(pending) > 2 * workers or (pool is None and pending):
                _write(writer, pending.popleft(), bar)
        while pending:
            _write(writer, pending.popleft(), bar)
        if writer.num_docs == 0:
            raise DataError(f"inputs {inputs} hold no non-empty document; nothing to write")
        header = writer.finish()
    except BaseException:
        writer.abort()
        raise
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
    return header


def _write(writer, result, bar):
    docs = result.get() if hasattr(result, "get") else result
    for tokens in docs:
        writer.add(tokens)
    bar.update(len(docs))


@cli_main(errors=(DataError,))
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, help="files, folders, globs or a hub dataset name")
    p.add_argument("--tokenizer", required=True, help="Hugging Face tokenizer folder or sentencepiece .model")
    p.add_argument("--output", required=True, help="output prefix (writes PREFIX.bin and PREFIX.idx)")
    p.add_argument("--text-field", default="text")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=256, help="documents per worker task")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing PREFIX.bin/.idx (only once the new ones are complete)")
    args = p.parse_args(argv)
    h = ingest(args.input, args.tokenizer, args.output, args.text_field, args.workers, args.batch_size,
               overwrite=args.overwrite)
    print(f"wrote {args.output}.bin/.idx: {h['num_docs']} documents, {h['num_tokens']} tokens "
          f"({h['dtype']}), {h['empty_documents']} empty documents skipped")

