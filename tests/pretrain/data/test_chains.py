"""The arithmetic-chain task: answers against an independent evaluation of the written expression,
depth per problem, and held-out problems that never occur in training or in each other."""

import random

import pytest

from pretrain.data.chains import chain_corpus, chain_problem, depth_of, prepare_chains, split_of


def evaluate_text(prompt: str, modulus: int) -> int:
    """The prompt as a fully parenthesised Python expression, left to right: an evaluator that shares
    no code with the generator."""
    words = prompt.split()
    assert words[0] == "apply" and words[-1] == "="
    expression = words[1]
    for i in range(2, len(words) - 1, 2):
        expression = f"({expression} {words[i]} {words[i + 1]})"
    return eval(expression) % modulus


@pytest.mark.parametrize("modulus", [5, 7, 11])
def test_answers_equal_an_independent_evaluation_and_depth_counts_the_operations(modulus):
    rng = random.Random(modulus)
    for depth in (1, 2, 3, 5):
        for _ in range(50):
            prompt, answer = chain_problem(rng, depth, modulus)
            assert int(answer) == evaluate_text(prompt, modulus)
            assert depth_of(prompt) == depth == sum(w in "+*" for w in prompt.split())
            assert all(1 <= int(k) < modulus for k in prompt.split()[3:-1:2])  # no step erases the value


def test_splits_are_deterministic_and_keep_the_single_steps_in_training():
    assert split_of("apply 3 + 4 =", 0.5, 0.5) == "train"
    prompts = [chain_problem(random.Random(i), 3, 7)[0] for i in range(500)]
    splits = [split_of(p, 0.15, 0.2) for p in prompts]
    assert splits == [split_of(p, 0.15, 0.2) for p in prompts]
    assert {s: splits.count(s) / len(splits) for s in ("test", "valid")} == pytest.approx({"test": 0.2, "valid": 0.15},
                                                                                          abs=0.06)


def test_held_out_problems_are_distinct_deep_and_never_in_training():
    corpus = chain_corpus(seed=3, modulus=5, max_depth=3, train=4000, valid=150, test=300)
    assert corpus == chain_corpus(seed=3, modulus=5, max_depth=3, train=4000, valid=150, test=300)
    train = {p for p, _ in corpus["train"]}
    assert {depth_of(p) for p in train} == {1, 2, 3}
    for name in ("valid", "test"):
        prompts = [p for p, _ in corpus[name]]
        assert len(prompts) == len(set(prompts)) == {"valid": 150, "test": 300}[name]
        assert not set(prompts) & train
        assert {depth_of(p) for p in prompts} == {2, 3}
        assert all(int(a) == evaluate_text(p, 5) for p, a in corpus[name])
    assert not {p for p, _ in corpus["valid"]} & {p for p, _ in corpus["test"]}


def test_too_many_held_out_problems_is_an_error_naming_the_fix():
    with pytest.raises(ValueError, match="only .* distinct test problems.*ask for fewer"):
        chain_corpus(modulus=3, max_depth=2, train=10, valid=1, test=1000)


def test_prepared_corpus_answers_are_one_token_after_the_prompt(tmp_path):
    from pretrain.data import IndexedDataset, Tokenizer
    from pretrain.data.synthetic import read_eval

    files = prepare_chains(tmp_path, modulus=5, max_depth=3, train=3000, valid=100, test=200)
    tok = Tokenizer(files["tokenizer"])
    for name in ("valid", "test"):
        items = read_eval(files[name])
        for prompt, answer in items:
            ids = tok.encode(prompt)
            assert tok.encode(f"{prompt} {answer}") == ids + tok.encode(answer)
            assert len(tok.encode(answer)) == 1
    indexed = IndexedDataset(files["data"])
    documents = {tok.decode(indexed.doc(i).tolist()).rsplit(" ", 1)[0] for i in range(len(indexed))}
    assert not documents & {p for p, _ in read_eval(files["test"])}
    assert files["valid"].name == "eval_chains.jsonl"  # what the trainer evaluates: never the test file
