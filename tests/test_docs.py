"""The README is a front door (short) and the docs' links and named files exist."""

import re

import pytest

from helpers.training import REPO

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
# a repository file named in backticks: under a tracked top-level folder, with a file extension
NAMED = re.compile(r"`((?:looplm|pretrain|posttrain|runtime|evaluation|experiments|benchmarks|configs|launch|tests|docs)"
                   r"/[\w./-]*\.(?:py|yaml|md|json|png|sh|sbatch|txt))`")


def test_the_readme_is_short():
    assert len((REPO / "README.md").read_text().splitlines()) <= 350


def missing_files(text: str, base) -> list:
    links = [t.split("#")[0] for t in LINK.findall(text) if not t.startswith(("http:", "https:", "#", "mailto:"))]
    missing = [t for t in links if t and not (base / t).exists()]
    return missing + [f for f in NAMED.findall(text) if "*" not in f and "{" not in f and not (REPO / f).exists()]


def test_the_check_finds_a_missing_link_and_a_missing_named_file():
    text = "[a](docs/real_text.md) [b](docs/nothing.md) `configs/smoke.yaml` `configs/nothing.yaml` `runs/x.json`"
    assert missing_files(text, REPO) == ["docs/nothing.md", "configs/nothing.yaml"]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_relative_link_and_named_file_exists(doc):
    missing = missing_files(doc.read_text(), doc.parent)
    assert not missing, f"{doc.name} names files that do not exist: {missing}"
