"""Arithmetic chains: a task whose required depth is a per-example knob (issue: loops that buy depth).

A number in Z_m and `depth` operations applied in turn, left to right, answered without
intermediate steps, so the model must carry the running value through `depth` dependent steps
within one forward pass (a fixed-depth network can do a bounded number of them):

    apply 4 + 3 * 2 + 6 = 3          # ((4 + 3) * 2 + 6) mod 7 = 3, depth 3

Operations are `+ k` and `* k` with k in 1..m-1 (each a bijection of Z_m, so no step erases the
value). Depth-1 problems (the single steps) are all in training; a problem of depth >= 2 belongs to
train, validation or test by the CRC-32 of its prompt (`split_of`), so held-out problems are chains
never seen in training. This is the looped-transformer setting of Saunshi et al. (ICLR 2025): a
block applied more times can carry out more dependent steps.

    python -m pretrain.data chains --output data/chains
"""

import itertools
import json
import random
import zlib
from pathlib import Path

from runtime.cli import cli_main

from .errors import DataError

VERSION = 1  # of the generator: part of the corpus recipe, so a changed generator regenerates corpora
OPS = {"+": lambda v, k, m: (v + k) % m, "*": lambda v, k, m: (v * k) % m}
SPLITS = ("train", "valid", "test")


def steps_of(modulus: int) -> list[tuple[str, int]]:
    """Every single operation (op, k) of the task."""
    return [(op, k) for op in OPS for k in range(1, modulus)]


def prompt_of(x: int, steps) -> str:
    return f"apply {x} " + " ".join(f"{op} {k}" for op, k in steps) + " ="


def answer_of(prompt: str, modulus: int) -> str:
    """The answer of a written prompt (parsed back, as an evaluator of the text computes it)."""
    words = prompt.split()
    value = int(words[1])
    for op, k in zip(words[2:-1:2], words[3:-1:2]):
        value = OPS[op](value, int(k), modulus)
    return str(value)


def chain_problem(rng: random.Random, depth: int, modulus: int) -> tuple[str, str]:
    """(prompt, answer): `depth` operations drawn uniformly, applied left to right to a uniform x."""
    x, steps = rng.randrange(modulus), [rng.choice(steps_of(modulus)) for _ in range(depth)]
    value = x
    for op, k in steps:
        value = OPS[op](value, k, modulus)
    return prompt_of(x, steps), str(value)


def depth_of(prompt: str) -> int:
    """The number of operations a prompt asks for."""
    return (len(prompt.split()) - 3) // 2


def split_of(prompt: str, valid_share: float, test_share: float) -> str:
    """train / valid / test of a problem by the CRC-32 of its prompt; depth-1 problems (the single
    steps) are always train. Deterministic: the same prompt always lands in the same split."""
    if depth_of(prompt) == 1:
        return "train"
    u = zlib.crc32(prompt.encode()) / 2 ** 32
    return "test" if u < test_share else "valid" if u < test_share + valid_share else "train"


def chain_corpus(seed: int = 0, modulus: int = 7, max_depth: int = 3, train: int = 60000, valid: int = 600,
                 test: int = 1500, valid_share: float = 0.15, test_share: float = 0.2) -> dict[str, list[tuple[str, str]]]:
    """{"train": [...], "valid": [...], "test": [...]} of (prompt, answer), depth ~ U{1..max_depth}.
    Training problems are drawn with repetition (a problem space of a few thousand); validation and
    test problems are distinct, of depth >= 2, spread evenly over the depths 2..max_depth, and never
    in training by content (`split_of`)."""
    if modulus < 2 or max_depth < 2:
        raise ValueError(f"modulus={modulus}, max_depth={max_depth}: need modulus >= 2 and max_depth >= 2")
    rng = random.Random(seed)
    train_items = []
    while len(train_items) < train:
        p, a = chain_problem(rng, rng.randint(1, max_depth), modulus)
        if split_of(p, valid_share, test_share) == "train":
            train_items.append((p, a))
    held = {"valid": [], "test": []}
    for name, count in (("valid", valid), ("test", test)):
        depths = list(range(2, max_depth + 1))
        for i, depth in enumerate(depths):  # an even share per depth; what a small depth lacks goes deeper
            share = -(-(count - len(held[name])) // (len(depths) - i))
            space = [prompt_of(x, chain) for x in range(modulus)
                     for chain in itertools.product(steps_of(modulus), repeat=depth)]
            mine = [p for p in space if split_of(p, valid_share, test_share) == name]
            rng.shuffle(mine)
            held[name] += [(p, answer_of(p, modulus)) for p in mine[:share]]
        if len(held[name]) < count:
            raise ValueError(f"only {len(held[name])} distinct {name} problems of depth 2..{max_depth} exist for "
                             f"modulus {modulus} (asked {count}); ask for fewer, or use a larger modulus or max_depth")
    return {"train": train_items, **held}


def prepare_chains(out_dir: str | Path, seed: int = 0, vocab_size: int = 64, **kwargs) -> dict:
    """The corpus, tokenizer and indexed files in `out_dir` (reused when made with the same arguments):
    train.jsonl ({"text"}), eval_chains.jsonl (the validation problems: what the trainer evaluates),
    test_chains.jsonl (read once, by the final scoring)."""
    from .synthetic import bound_arguments, prepare_corpus

    args = bound_arguments(chain_corpus, seed, **kwargs)

    def write(out: Path) -> dict:
        corpus = chain_corpus(**args)
        files = {"train": out / "train.jsonl", "valid": out / "eval_chains.jsonl", "test": out / "test_chains.jsonl"}
        with open(files["train"], "w") as f:
            f.writelines(json.dumps({"text": f"{p} {a}"}) + "\n" for p, a in corpus["train"])
        for name in ("valid", "test"):
            with open(files[name], "w") as f:
                f.writelines(json.dumps({"prompt": p, "answer": a}) + "\n" for p, a in corpus[name])
        return files

    recipe = {"task": "chains", "version": VERSION, "vocab_size": vocab_size, **args}
    return prepare_corpus(out_dir, recipe, write, vocab_size)


@cli_main(errors=(DataError, ValueError))
def main(argv=None):
    from .synthetic import corpus_parser

    p = corpus_parser(__doc__)
    p.set_defaults(vocab_size=64)
    p.add_argument("--modulus", type=int, default=7)
    p.add_argument("--max-depth", type=int, default=3, help="depths are drawn from 1..max-depth")
    p.add_argument("--train", type=int, default=60000, help="training problems (drawn with repetition)")
    p.add_argument("--valid", type=int, default=600)
    p.add_argument("--test", type=int, default=1500)
    args = p.parse_args(argv)
    for name, path in prepare_chains(args.output, args.seed, args.vocab_size,
                                     modulus=args.modulus, max_depth=args.max_depth, train=args.train,
                                     valid=args.valid, test=args.test).items():
        print(f"{name}: {path}")
