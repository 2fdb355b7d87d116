"""The GSM8K-shaped word problems: every reference solution is right (checked by an evaluator that
reads the question text, not the generator), test problems never occur in training, and the files are
GSM8K format for post-training."""

import json
import random
import re
from collections import Counter

import pytest

from posttrain.data import is_correct, load_problems
from pretrain.data import IndexedDataset, Tokenizer
from pretrain.data.word_problems import MAX_VALUE, prepare_word_problems, split_of, word_problem, word_problem_corpus

VERBS = {"buys": "+", "finds": "+", "gets": "+", "gives": "-", "loses": "-", "sells": "-", "ends": "*"}


def solve(question: str) -> list[tuple[int, str, int]]:
    """(value, operator, operand) for every step, read from the sentences of the question."""
    sentences = [s.strip() for s in question.split(" . ")]
    value = int(re.fullmatch(r"\w+ has (\d+) \w+", sentences[0]).group(1))
    steps = []
    for sentence in sentences[1:-1]:
        op = VERBS[sentence.split()[1]]
        n = int(re.search(r"\b(\d+)\b", sentence).group(1))
        steps.append((value, op, n))
        value = {"+": value + n, "-": value - n, "*": value * n}[op]
    assert sentences[-1].startswith("How many")
    return steps


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 6])
def test_reference_solutions_are_right(steps):
    rng = random.Random(steps)
    for _ in range(300):
        question, answer, final = word_problem(rng, steps)
        expected = solve(question)
        lines = answer.split("\n")
        assert len(lines) == steps + 1 == len(expected) + 1
        value = expected[0][0]
        for line, (a, op, n) in zip(lines, expected):
            assert a == value
            value = {"+": a + n, "-": a - n, "*": a * n}[op]
            assert line == f"{a} {op} {n} = {value} ."
            assert 0 <= value <= MAX_VALUE
        assert lines[-1] == f"#### {value}" and final == value


def test_test_problems_never_occur_in_training_and_files_are_gsm8k_format(tmp_path):
    files = prepare_word_problems(tmp_path, seed=3, vocab_size=160, train=3000, test=200, max_steps=3)
    tok = Tokenizer(files["tokenizer"])
    indexed = IndexedDataset(files["data"])
    documents = [tok.decode(indexed.doc(i).tolist()) for i in range(len(indexed))]
    assert len(documents) == 3000 and all("\n#### " in d for d in documents)  # newlines survive the tokenizer
    trained = {d.split("\nAnswer:")[0].removeprefix("Question: ") for d in documents}
    solutions = {d.split("\nAnswer: ")[1] for d in documents}
    test = load_problems(str(files["gsm_test"]))
    assert len(test) == 200 and len({p.prompt for p in test}) == 200
    for problem in test:
        question = problem.prompt.removeprefix("Question: ").removesuffix("\nAnswer:")
        assert question not in trained and problem.solution.strip() not in solutions  # not even the same chain
        assert is_correct(problem.solution, problem)  # the reference passes GSM8K answer extraction
    steps = Counter(p.solution.count("\n") for p in test)
    assert set(steps) == {1, 2, 3}  # every difficulty is tested
    train = [json.loads(line) for line in files["gsm_train"].open()]
    assert {r["question"] for r in train} == trained
    # The same call reuses the files; other arguments regenerate them.
    before = files["gsm_test"].stat().st_mtime_ns
    assert prepare_word_problems(tmp_path, seed=3, vocab_size=160, train=3000, test=200, max_steps=3) == files
    assert files["gsm_test"].stat().st_mtime_ns == before
    prepare_word_problems(tmp_path, seed=4, vocab_size=160, train=3000, test=200, max_steps=3)
    assert word_problem_corpus(4, 3000, 200, 3)["test"][0][0] in files["gsm_test"].read_text()


def test_three_splits_are_disjoint_by_solution_deterministic_and_one_per_solution():
    splits = word_problem_corpus(5, train=2000, test=300, max_steps=4, valid=200, one_per_solution=True)
    assert splits == word_problem_corpus(5, train=2000, test=300, max_steps=4, valid=200, one_per_solution=True)
    solutions = {k: [a for _, a in v] for k, v in splits.items()}
    assert [len(v) for v in solutions.values()] == [2000, 200, 300]
    for split, answers in solutions.items():  # each side of the CRC split holds only its own solutions
        assert {split_of(a) for a in answers} == {split}
    assert not set(solutions["train"]) & (set(solutions["valid"]) | set(solutions["test"]))
    assert not set(solutions["valid"]) & set(solutions["test"])
    for split in ("valid", "test"):  # deduplicated: one problem per solution
        assert len(set(solutions[split])) == len(solutions[split])
    # without validation problems the validation side trains, and the test split is what it always was
    old = word_problem_corpus(5, train=2000, test=300, max_steps=4)
    assert old["valid"] == [] and {split_of(a) for _, a in old["train"]} == {"train", "valid"}
    with pytest.raises(ValueError, match="distinct solutions"):
        word_problem_corpus(5, train=10, test=200, max_steps=1, one_per_solution=True)
