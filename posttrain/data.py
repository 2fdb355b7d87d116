"""Reasoning problems for post-training and evaluation: GSM8K-format jsonl (`question`, `answer`
whose last line is `#### N`) or the embedded synthetic tasks; and the answer extraction rules.

    load_problems("../shared/data/gsm8k/test.jsonl")   load_problems("synthetic:mano")
"""

import random
import re
from decimal import Decimal
from dataclasses import dataclass
from pathlib import Path

from runtime.records import text_pairs


class ProblemError(ValueError):
    """A malformed problem source or record; names the file and line."""


@dataclass
class Problem:
    prompt: str  # what the reasoner is given
    solution: str  # the target continuation (rationale + final line), for SFT
    answer: str  # the normalised final answer
    one_word: bool = False  # synthetic tasks: the answer is the completion's first word


SYNTHETIC_TRAIN_SIZE = 4000  # fresh Mano problems when no limit is given (multihop has fewer)
NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")
ANSWER_MARK = "####"  # GSM8K's final line: `#### 42`
ANSWER_PATTERN = ANSWER_MARK + r"\s*([^\n]+)"  # a model's answer: the text after the mark (the first group)


def normalize_number(text: str) -> str:
    """'1,234.50' -> '1234.5', '$18' -> '18', '-3.0' -> '-3', '.5' -> '0.5'; text without a number
    comes back stripped."""
    match = NUMBER.search(text.replace(",", ""))
    if not match:
        return text.strip(" .")
    value = format(Decimal(match.group(0)).normalize(), "f")
    return "0" if value in ("-0", "0") else value


def extract_reference(answer: str) -> str:
    """The number after the last ANSWER_MARK in a GSM8K answer."""
    if ANSWER_MARK not in answer:
        raise ProblemError(f"GSM8K answer has no '{ANSWER_MARK}' line: {answer[-80:]!r}")
    return normalize_number(answer.rsplit(ANSWER_MARK, 1)[1])


def extract_prediction(text: str, pattern: str = ANSWER_PATTERN) -> str | None:
    """The configured answer pattern (its first group) if it matches, else the last number; commas,
    currency and trailing units stripped. None when the text holds no number."""
    match = re.search(pattern, text) if pattern else None
    if match:
        found = NUMBER.findall(match.group(1).replace(",", ""))
        if found:
            return normalize_number(found[0])
    numbers = NUMBER.findall(text)
    return normalize_number(numbers[-1]) if numbers else None


def _synthetic(task: str, split: str, seed: int, count: int) -> list[Problem]:
    from pretrain.data.synthetic import (MANO_DEFAULTS, default_corpus, mano_example, multihop_world,
                                         two_hop_questions)

    if task == "mano":
        held_out = default_corpus(seed)[1]["mano"]
        if split == "eval":
            items = held_out
        else:  # fresh problems at the evaluated difficulty, the held-out ones never among them
            rng, avoid, items = random.Random(seed + 1000), {p for p, _ in held_out}, []
            L = MANO_DEFAULTS["max_ops"]
            while len(items) < count:
                prompt, answer = mano_example(rng, L, ops=L, modulus=MANO_DEFAULTS["modulus"])
                if prompt not in avoid:
                    items.append((prompt, answer))
    elif task == "multihop":
        docs, evals = default_corpus(seed)
        if split == "eval":
            items = evals["multihop"]
        else:
            held_out = {p for p, _ in evals["multihop"]}
            items = [(q, a) for q, a in two_hop_questions(multihop_world(seed)) if q not in held_out]
    else:
        raise ProblemError(f"synthetic task {task!r} is unknown; use synthetic:mano or synthetic:multihop")
    return [Problem(p, f" {a}", a, one_word=True) for p, a in items[:count]]


def load_problems(source: str, limit: int | None = None, split: str = "train", seed: int = 1234) -> list[Problem]:
    """Problems from a GSM8K-format jsonl path or `synthetic:<task>` (split train or eval)."""
    if source.startswith("synthetic:"):
        return _synthetic(source.split(":", 1)[1], split, seed, limit or SYNTHETIC_TRAIN_SIZE)
    path = Path(source)
    if not path.exists():
        raise ProblemError(f"problem file {path} does not exist (or use synthetic:mano / synthetic:multihop)")
    problems = []
    for n, question, answer in text_pairs(path, ("question", "answer"), ProblemError):
        try:
            final = extract_reference(answer)
        except ProblemError as err:
            raise ProblemError(f"{path}:{n}: {err}") from err
        problems.append(Problem(f"Question: {question}\nAnswer:", " " + answer.strip(), final))
        if limit and len(problems) >= limit:
            break
    if not problems:
        raise ProblemError(f"problem file {path} holds no record")
    return problems


def is_correct(completion: str, problem: Problem, pattern: str = ANSWER_PATTERN) -> bool:
    if problem.one_word:
        words = completion.split()
        return bool(words) and words[0].strip(".") == problem.answer
    return extract_prediction(completion, pattern) == problem.answer
