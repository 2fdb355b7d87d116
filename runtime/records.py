"""Reading jsonl files of text records (held-out problems, post-training problems)."""

import json
from collections.abc import Iterator
from pathlib import Path


def text_pairs(path: str | Path, keys: tuple[str, str], error: type[Exception],
               what: str = "record") -> Iterator[tuple[int, str, str]]:
    """(line number, record[keys[0]], record[keys[1]]) for each non-blank line of a jsonl file. A line
    that is not a JSON object with both keys as text raises `error` naming the file and the line."""
    a, b = keys
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                first, second = record[a], record[b]
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise error(f"{path}:{n}: not a {what} with '{a}' and '{b}' ({err!r})") from err
            if not isinstance(first, str) or not isinstance(second, str):
                raise error(f"{path}:{n}: '{a}' and '{b}' must be text")
            yield n, first, second
