"""The embedded default corpus: synthetic reasoning tasks generated in code (spec/ouro.md section 6),
so the smoke run needs no download and trains something whose accuracy can be measured per depth.

* Mano: modular arithmetic written in prefix notation, answer given directly: "mano 2 : + * 3 5 2 = 3".
  The operator count l ~ U{1..L}; the operator budget of a node is split uniformly at random between its
  subtrees. Held-out evaluation uses l = L only, as the paper does. The paper's F_23 at L = 3 is far
  beyond a CPU smoke run; the embedded corpus uses F_7 at L = 2 (`MANO_DEFAULTS`), which a tiny model
  learns to well above chance in a few hundred steps.
* Multi-hop facts: entities in K layers, each linked by every relation to an entity of the next layer.
  Training holds every 1-hop fact ("the teacher of bako is tiru .") and part of the 2-hop questions
  ("who is the teacher of the friend of bako ? tiru"); evaluation asks held-out 2-hop questions.

    python -m pretrain.data synthetic --output data/default   # corpus + tokenizer + indexed files
"""

import argparse
import inspect
import itertools
import json
import random
from pathlib import Path

from runtime.cli import cli_main
from runtime.records import text_pairs

from .errors import DataError
from .indexed import VERSION as INDEX_VERSION

MODULUS = 23  # the paper's F_23; smaller moduli make an easier task (fewer table entries to learn)
MANO_DEFAULTS = {"max_ops": 2, "modulus": 7}  # the embedded corpus's Mano (see above)
OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
RELATIONS = ["teacher", "friend", "boss", "mentor", "neighbor", "partner"]


def mano_tree(rng: random.Random, ops: int, modulus: int = MODULUS) -> tuple[list[str], int]:
    """A random expression with `ops` operators: (prefix tokens, value mod `modulus`)."""
    if ops == 0:
        leaf = rng.randrange(modulus)
        return [str(leaf)], leaf
    op = rng.choice(sorted(OPS))
    left_ops = rng.randint(0, ops - 1)
    left, a = mano_tree(rng, left_ops, modulus)
    right, b = mano_tree(rng, ops - 1 - left_ops, modulus)
    return [op] + left + right, OPS[op](a, b) % modulus


def mano_example(rng: random.Random, max_ops: int, ops: int | None = None, modulus: int = MODULUS) -> tuple[str, str]:
    """(prompt, answer); prompt + " " + answer is the training document."""
    ops = ops if ops is not None else rng.randint(1, max_ops)
    tokens, value = mano_tree(rng, ops, modulus)
    return f"mano {ops} : {' '.join(tokens)} =", str(value)


def entity_names(count: int, seed: int) -> list[str]:
    syllables = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]
    names = sorted({a + b for a, b in itertools.product(syllables, repeat=2)})
    random.Random(seed).shuffle(names)
    return names[:count]


def multihop_world(seed: int, layers: int = 4, per_layer: int = 16, relations: int = 4):
    """(entity layers, facts {(relation, entity): entity}, relation names)."""
    rng = random.Random(seed)
    names = entity_names(layers * per_layer, seed)
    layer_of = [names[i * per_layer:(i + 1) * per_layer] for i in range(layers)]
    rels = RELATIONS[:relations]
    facts = {(r, e): rng.choice(layer_of[i + 1]) for i in range(layers - 1) for e in layer_of[i] for r in rels}
    return layer_of, facts, rels


def two_hop_questions(world) -> list[tuple[str, str]]:
    layer_of, facts, rels = world
    out = []
    for i in range(len(layer_of) - 2):
        for e in layer_of[i]:
            for r1, r2 in itertools.product(rels, rels):  # "the r2 of the r1 of e"
                out.append((f"who is the {r2} of the {r1} of {e} ?", facts[(r2, facts[(r1, e)])]))
    return out


def default_corpus(seed: int = 0, mano_train: int = 8000, mano_eval: int = 200,
                   max_ops: int = MANO_DEFAULTS["max_ops"], qa_train_fraction: float = 0.5, qa_eval: int = 200,
                   fact_repeats: int = 8, qa_repeats: int = 4, per_layer: int = 16, relations: int = 4,
                   modulus: int = MANO_DEFAULTS["modulus"]):
    """(training documents, {task: [(prompt, answer)]}); deterministic in its arguments. Facts and
    training questions are repeated so that they are a fair share of the tokens next to Mano.
    A task with no training documents (mano_train=0, or fact_repeats=qa_repeats=0) has no evaluation set."""
    rng = random.Random(seed)
    docs = [" ".join(mano_example(rng, max_ops, modulus=modulus)) for _ in range(mano_train)]
    evals = {"mano": [mano_example(rng, max_ops, max_ops, modulus) for _ in range(mano_eval if mano_train else 0)]}
    world = multihop_world(seed, per_layer=per_layer, relations=relations)
    _, facts, _ = world
    docs += [f"the {r} of {e} is {target} ." for (r, e), target in sorted(facts.items())] * fact_repeats
    questions = two_hop_questions(world)
    rng.shuffle(questions)
    n_train = int(len(questions) * qa_train_fraction)
    docs += [f"{q} {a}" for q, a in questions[:n_train]] * qa_repeats
    evals["multihop"] = questions[n_train:n_train + qa_eval] if fact_repeats or qa_repeats else []
    rng.shuffle(docs)
    # Prompts held out for evaluation never appear in training (nor with another answer).
    seen = {d.rsplit(" ", 1)[0] for d in docs}
    evals = {task: [(p, a) for p, a in items if p not in seen] for task, items in evals.items() if items}
    return docs, evals


def first_word(text: str) -> str:
    words = text.split()
    return words[0] if words else ""


def exact_match(completions: list[str], answers: list[str]) -> float:
    """Fraction of completions whose first word equals the answer (both tasks answer with one word)."""
    if not answers:
        return 0.0
    return sum(first_word(c) == a for c, a in zip(completions, answers)) / len(answers)


def write_default_corpus(out_dir: str | Path, seed: int = 0, **kwargs) -> dict:
    """Write train.jsonl ({"text"}) and eval_<task>.jsonl ({"prompt", "answer"}); returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    docs, evals = default_corpus(seed, **kwargs)
    for stale in out.glob("eval_*.jsonl"):  # a task this recipe does not evaluate must not be read
        stale.unlink()
    written = {"train": out / "train.jsonl"}
    with open(written["train"], "w") as f:
        f.writelines(json.dumps({"text": d}) + "\n" for d in docs)
    for task, items in evals.items():
        written[task] = out / f"eval_{task}.jsonl"
        with open(written[task], "w") as f:
            f.writelines(json.dumps({"prompt": p, "answer": a}) + "\n" for p, a in items)
    return written


def read_eval(path: str | Path) -> list[tuple[str, str]]:
    """The held-out problems of an eval_<task>.jsonl: (prompt, answer) of each {"prompt", "answer"}
    record; any other line (a training file's {"text"}, broken JSON, non-text values) is a DataError
    naming the file and line."""
    return [(prompt, answer) for _, prompt, answer in text_pairs(path, ("prompt", "answer"), DataError,
                                                                  "held-out record")]


def bound_arguments(fn, *args, **kwargs) -> dict:
    """Every argument of a call to `fn`, defaults included: what a corpus was made from."""
    bound = inspect.signature(fn).bind(*args, **kwargs)
    bound.apply_defaults()
    return dict(bound.arguments)


def prepare_corpus(out_dir: str | Path, recipe: dict, write, vocab_size: int, workers: int = 1,
                   progress: bool = False, user_symbols: list[str] | None = None, tokenizer_texts=None,
                   also_ingest: tuple = (), real_text: bool = False) -> dict:
    """A corpus in `out_dir`: `write(out)` writes train.jsonl ({"text"}) and any side files and returns
    their paths; then a sentencepiece tokenizer trained on train.jsonl (`tokenizer_texts(path)`: the
    strings it is trained on, default its documents; `real_text`: see train_sentencepiece) and the indexed files of train.jsonl and of the
    side files named in `also_ingest` (out/NAME.bin/.idx). Reused when complete and made from the
    same `recipe` (corpus.json, written last), regenerated otherwise."""
    from .ingest import ingest
    from .tokenizer import read_texts, train_sentencepiece

    out = Path(out_dir)
    files = {"train": out / "train.jsonl", "tokenizer": out / "tokenizer.model", "data": out / "train"}
    stamp = out / "corpus.json"
    recipe = {**recipe, "index_version": INDEX_VERSION}  # an older index format is rebuilt too
    if stamp.exists():
        made = json.loads(stamp.read_text())
        made = made if {"recipe", "files"} <= set(made) else {"recipe": None, "files": {}}  # an older stamp
        kept = {**files, **{name: out / path for name, path in made["files"].items()}}
        complete = (all(p.exists() for p in kept.values() if p != files["data"])
                    and all((out / f"{name}.idx").exists() for name in ("train", *also_ingest)))
        if made["recipe"] == recipe and complete:
            return kept
        print(f"note: {out} holds a corpus made with other arguments or with files missing; regenerating it",
              flush=True)
        stamp.unlink()
        for name, path in made["files"].items():
            (out / path).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    written = write(out)
    texts = tokenizer_texts(files["train"]) if tokenizer_texts else read_texts(files["train"], "text")
    train_sentencepiece(texts, files["tokenizer"], vocab_size, user_symbols=user_symbols, real_text=real_text)
    for name, source in (("train", files["train"]), *((name, written[name]) for name in also_ingest)):
        ingest([str(source)], files["tokenizer"], out / name, workers=workers, progress=progress,
               overwrite=True)  # the recipe stamp above decided that this corpus is regenerated
    files.update(written)
    side = {name: str(Path(path).relative_to(out)) for name, path in written.items() if name != "train"}
    stamp.write_text(json.dumps({"recipe": recipe, "files": side}, indent=1))
    return files


def prepare_default_corpus(out_dir: str | Path, seed: int = 0, vocab_size: int = 256, workers: int = 1,
                           progress: bool = False, **kwargs) -> dict:
    """The embedded corpus, its tokenizer and indexed files in `out_dir` (see prepare_corpus);
    eval_<task>.jsonl files are returned under the task's name."""
    recipe = {"vocab_size": vocab_size, **bound_arguments(default_corpus, seed, **kwargs)}
    return prepare_corpus(out_dir, recipe,
                          lambda out: write_default_corpus(out, seed, **kwargs), vocab_size, workers, progress)


def corpus_parser(doc: str) -> argparse.ArgumentParser:
    """The arguments every generated-corpus command takes: --output, --seed, --vocab-size."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", required=True, type=Path)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vocab-size", type=int, default=256)
    return p


@cli_main(errors=(DataError,))
def main(argv=None):
    p = corpus_parser(__doc__)
    p.add_argument("--mano-train", type=int, default=8000)
    p.add_argument("--max-ops", type=int, default=MANO_DEFAULTS["max_ops"])
    p.add_argument("--modulus", type=int, default=MANO_DEFAULTS["modulus"])
    p.add_argument("--workers", type=int, default=1)
    args = p.parse_args(argv)
    files = prepare_default_corpus(args.output, args.seed, args.vocab_size, args.workers, progress=True,
                                   mano_train=args.mano_train, max_ops=args.max_ops, modulus=args.modulus)
    for name, path in files.items():
        print(f"{name}: {path}")

