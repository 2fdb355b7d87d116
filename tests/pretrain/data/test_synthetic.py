"""The embedded default corpus: correct answers, held-out evaluation, determinism, end to end files."""

import json
import random

from pretrain.data import IndexedDataset, Tokenizer
from pretrain.data.synthetic import (MANO_DEFAULTS, default_corpus, exact_match, mano_example, multihop_world,
                                     prepare_default_corpus, two_hop_questions)


def eval_prefix(tokens):
    """Independent evaluator: right-to-left stack evaluation of a prefix expression mod 23."""
    stack = []
    for tok in reversed(tokens):
        if tok.isdigit():
            stack.append(int(tok))
        else:
            a, b = stack.pop(), stack.pop()
            stack.append({"+": a + b, "-": a - b, "*": a * b}[tok] % 23)
    assert len(stack) == 1
    return stack[0]


def test_mano_answers_are_the_value_of_the_prefix_expression():
    rng = random.Random(1)
    for _ in range(500):
        prompt, answer = mano_example(rng, max_ops=6)
        head, expr = prompt.rstrip(" =").split(" : ")
        tokens = expr.split()
        assert int(head.split()[1]) == sum(t in "+-*" for t in tokens)
        assert eval_prefix(tokens) == int(answer)


def test_two_hop_answers_follow_the_facts():
    world = multihop_world(3)
    layers, facts, rels = world
    assert len(facts) == (len(layers) - 1) * len(layers[0]) * len(rels)
    for question, answer in two_hop_questions(world):
        words = question.split()  # who is the R2 of the R1 of E ?
        r2, r1, e = words[3], words[6], words[8]
        assert facts[(r2, facts[(r1, e)])] == answer


def test_corpus_is_deterministic_and_evaluation_is_held_out():
    docs, evals = default_corpus(seed=4, mano_train=500)
    docs2, evals2 = default_corpus(seed=4, mano_train=500)
    assert docs == docs2 and evals == evals2
    assert docs != default_corpus(seed=5, mano_train=500)[0]
    training = set(docs)
    for task, items in evals.items():
        assert items, task
        assert not any(f"{p} {a}" in training for p, a in items)
    L = MANO_DEFAULTS["max_ops"]
    assert all(p.startswith(f"mano {L} :") for p, _ in evals["mano"])  # l = L only


def test_exact_match_uses_the_first_word():
    assert exact_match([" 5 mano 2", "7", "", "tiru ."], ["5", "8", "3", "tiru"]) == 0.5


def test_prepare_default_corpus_end_to_end(tmp_path):
    files = prepare_default_corpus(tmp_path, mano_train=300, vocab_size=128)
    tok = Tokenizer(files["tokenizer"])
    ds = IndexedDataset(files["data"])
    texts = [json.loads(line)["text"] for line in files["train"].read_text().splitlines()]
    assert len(ds) == len(texts)
    assert [ds.doc(i).tolist() for i in range(5)] == [tok.encode(t) + [tok.eos_id] for t in texts[:5]]
    assert tok.decode(ds.doc(0)[:-1]) == texts[0]


def test_a_corpus_made_with_other_arguments_is_regenerated(tmp_path):
    files = prepare_default_corpus(tmp_path, mano_train=300, vocab_size=128)
    first = files["mano"].read_text()
    assert prepare_default_corpus(tmp_path, mano_train=300, vocab_size=128)["mano"].read_text() == first
    again = prepare_default_corpus(tmp_path, mano_train=300, vocab_size=128, max_ops=3)
    held_out = [json.loads(line)["prompt"] for line in again["mano"].read_text().splitlines()]
    assert held_out and all(p.startswith("mano 3 :") for p in held_out)
    assert len(IndexedDataset(again["data"])) == len(again["train"].read_text().splitlines())


def test_a_corpus_without_a_readable_recipe_or_with_files_missing_is_regenerated(tmp_path):
    files = prepare_default_corpus(tmp_path, mano_train=300, vocab_size=128)
    (tmp_path / "corpus.json").write_text(json.dumps({"seed": 0}))  # the stamp of an older looplm
    files["mano"].unlink()
    again = prepare_default_corpus(tmp_path, mano_train=300, vocab_size=128)
    assert again["mano"].exists() and json.loads((tmp_path / "corpus.json").read_text())["recipe"]["mano_train"] == 300
    again["tokenizer"].unlink()
    assert prepare_default_corpus(tmp_path, mano_train=300, vocab_size=128)["tokenizer"].exists()
