"""A GSM8K-shaped synthetic task: short multi-step word problems over small numbers, with reference
solutions written one step per line and ending in `#### N` (GSM8K's answer format), so the same
extraction, evaluation and delimiters serve both. Difficulty is the number of steps.

    Question: Mia has 4 shells . Mia finds 3 more shells . Mia gives away 5 shells . How many shells
    does Mia have now ?
    Answer: 4 + 3 = 7 .
    7 - 5 = 2 .
    #### 2

`prepare_word_problems` writes the pretraining corpus (train.jsonl: "Question: ...\nAnswer: ..."
documents, a sentencepiece tokenizer that keeps newlines, indexed files) and GSM8K-format
gsm_train.jsonl / gsm_test.jsonl (and gsm_valid.jsonl when validation problems are asked for;
{"question", "answer"}) for post-training and `posttrain.evaluate`. Held-out problems never share a
solution with a training problem (`split_of`; tested).

    python -m pretrain.data word-problems --output data/word_problems
"""

import json
import random
import zlib
from pathlib import Path

from runtime.cli import cli_main

from .errors import DataError

NAMES = ["Tom", "Ann", "Bob", "Eva", "Sam", "Mia", "Leo", "Zoe", "Max", "Ivy"]
ITEMS = ["apples", "pens", "books", "coins", "cards", "shells", "stamps", "marbles"]
STEPS = {  # operator -> sentences; {n} is the operand, {who} the person, {item} the thing counted
    "+": ["{who} buys {n} more {item} .", "{who} finds {n} more {item} .", "{who} gets {n} {item} from a friend ."],
    "-": ["{who} gives away {n} {item} .", "{who} loses {n} {item} .", "{who} sells {n} {item} ."],
    "*": ["{who} ends up with {n} times as many {item} ."],
}
MAX_VALUE = 20  # every value in a solution stays in 0..MAX_VALUE
VERSION = 1  # of the generator: part of the corpus recipe, so a changed generator regenerates corpora


def _moves(rng: random.Random, value: int) -> list[tuple[str, int]]:
    """The steps that keep the value in 0..MAX_VALUE, each with a random operand."""
    moves = []
    if value < MAX_VALUE:
        moves.append(("+", rng.randint(1, min(9, MAX_VALUE - value))))
    if value > 0:
        moves.append(("-", rng.randint(1, min(9, value))))
    if 0 < value <= MAX_VALUE // 2:
        moves.append(("*", rng.randint(2, min(3, MAX_VALUE // value))))
    return moves


def word_problem(rng: random.Random, steps: int) -> tuple[str, str, int]:
    """(question, GSM8K-style answer with one step per line and `#### N`, N)."""
    who, item = rng.choice(NAMES), rng.choice(ITEMS)
    value = rng.randint(1, 9)
    sentences, lines = [f"{who} has {value} {item} ."], []
    for _ in range(steps):
        op, n = rng.choice(_moves(rng, value))
        new = {"+": value + n, "-": value - n, "*": value * n}[op]
        sentences.append(rng.choice(STEPS[op]).format(who=who, n=n, item=item))
        lines.append(f"{value} {op} {n} = {new} .")
        value = new
    sentences.append(f"How many {item} does {who} have now ?")
    return " ".join(sentences), "\n".join(lines + [f"#### {value}"]), value


def document(question: str, answer: str) -> str:
    """The pretraining text of a problem; its prefix up to "Answer:" is posttrain's GSM8K prompt."""
    return f"Question: {question}\nAnswer: {answer}"


def split_of(answer: str, share: int = 10) -> str:
    """The split of the problem space: a solution (its chain of numbers and operators) belongs to the
    test split when its CRC-32 falls in one 1/share of the range, to the validation split in another,
    else to training. Held-out problems therefore never share a solution with a training problem, not
    only their wording, at every number of steps."""
    r = zlib.crc32(answer.encode()) % share
    return "test" if r == 0 else "valid" if r == 1 else "train"


def word_problem_corpus(seed: int = 0, train: int = 20000, test: int = 500, max_steps: int = 4, valid: int = 0,
                        one_per_solution: bool = False) -> dict:
    """{"train", "valid", "test": [(question, answer)]}, steps ~ U{1..max_steps}; held-out questions
    distinct, and with `one_per_solution` no two held-out problems share a solution (independent
    units for the intervals). Without validation problems (valid=0) the validation side of
    `split_of` goes to training."""
    rng = random.Random(seed)
    quota = {"train": train, "valid": valid, "test": test}
    items, asked, solutions = {k: [] for k in quota}, set(), set()
    for _ in range(1000 * (train + valid + test)):
        if all(len(items[k]) == n for k, n in quota.items()):
            return items
        q, a, _ = word_problem(rng, rng.randint(1, max_steps))
        side = split_of(a)
        side = "train" if side == "valid" and not valid else side
        if side == "train":
            if len(items["train"]) < train:
                items["train"].append((q, a))
        elif len(items[side]) < quota[side] and q not in asked and not (one_per_solution and a in solutions):
            asked.add(q)
            solutions.add(a)
            items[side].append((q, a))
    raise ValueError(f"could not draw {valid} validation and {test} test problems"
                     f"{' with distinct solutions' if one_per_solution else ''} with up to {max_steps} steps; "
                     "ask for fewer or allow more steps")


def prepare_word_problems(out_dir: str | Path, seed: int = 0, vocab_size: int = 256, **kwargs) -> dict:
    """The corpus, tokenizer and indexed files of the task in `out_dir` (reused when made with the same
    arguments); returns their paths, with gsm_train / gsm_test the GSM8K-format problem files."""
    from .synthetic import bound_arguments, prepare_corpus

    def write(out: Path) -> dict:
        splits = word_problem_corpus(seed, **kwargs)
        files = {"train": out / "train.jsonl"}
        with open(files["train"], "w") as f:
            f.writelines(json.dumps({"text": document(q, a)}) + "\n" for q, a in splits["train"])
        for split, items in splits.items():
            if items or split != "valid":
                files[f"gsm_{split}"] = out / f"gsm_{split}.jsonl"
                with open(files[f"gsm_{split}"], "w") as f:
                    f.writelines(json.dumps({"question": q, "answer": a}) + "\n" for q, a in items)
        return files

    recipe = {"task": "word_problems", "version": VERSION, "vocab_size": vocab_size,
              **bound_arguments(word_problem_corpus, seed, **kwargs)}
    return prepare_corpus(out_dir, recipe, write, vocab_size, user_symbols=["\n"])


@cli_main(errors=(DataError,))
def main(argv=None):
    from .synthetic import corpus_parser

    p = corpus_parser(__doc__)
    p.add_argument("--train", type=int, default=20000, help="training problems")
    p.add_argument("--test", type=int, default=500, help="held-out test problems")
    p.add_argument("--valid", type=int, default=0, help="held-out validation problems (gsm_valid.jsonl)")
    p.add_argument("--one-per-solution", action="store_true", help="no two held-out problems share a solution")
    p.add_argument("--max-steps", type=int, default=4, help="solution steps are drawn from 1..max-steps")
    args = p.parse_args(argv)
    for name, path in prepare_word_problems(args.output, args.seed, args.vocab_size, train=args.train,
                                            test=args.test, max_steps=args.max_steps, valid=args.valid,
                                            one_per_solution=args.one_per_solution).items():
        print(f"{name}: {path}")
