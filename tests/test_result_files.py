"""Committed result files name no machine's folders: every path in them is relative to the repository
(a figure's file must make sense on a fresh clone), and the drivers write them that way."""

import json
import re
import subprocess

import pytest

from helpers.training import REPO

ABSOLUTE = re.compile(r"(?:^|[\s=:'\"(\[,])(/(?:[\w.-]+/)+[\w.-]*)")  # /a/b..., at a value's start or after a separator


def committed_results() -> list:
    files = subprocess.run(["git", "ls-files", "experiments/results/*.json", "benchmarks/results/*.json"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.split()
    return files


def strings(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from strings(k)
            yield from strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from strings(v)


def absolute_paths(value) -> list:
    return [m for s in strings(value) for m in ABSOLUTE.findall(s)]


def test_the_pattern_finds_absolute_paths_and_nothing_else():
    assert absolute_paths({"a": "/work/main/runs/x", "b": ["--data /tmp/d.jsonl"], "/root/k": 1}) == [
        "/work/main/runs/x", "/tmp/d.jsonl", "/root/k"]
    assert absolute_paths({"a": "runs/x/hf", "b": "tokens/s", "c": "8 / 2 = 4", "d": "1/2", "e": "a/b/c"}) == []


@pytest.mark.parametrize("path", committed_results())
def test_committed_result_files_hold_no_absolute_path(path):
    found = absolute_paths(json.loads((REPO / path).read_text()))
    assert not found, f"{path} names machine paths {found[:3]}: write paths relative to the repository"


def test_the_drivers_results_writer_makes_repository_paths_relative(tmp_path):
    from experiments.ouro_synthetic import save_json

    save_json(tmp_path / "r.json", {"run": str(REPO / "runs" / "x"), "cmd": f"--data {REPO}/data/d.jsonl", "n": 1})
    assert json.loads((tmp_path / "r.json").read_text()) == {"run": "runs/x", "cmd": "--data data/d.jsonl", "n": 1}
