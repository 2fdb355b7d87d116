"""Answer extraction and the four-row evaluation table on a tiny model and a tiny GSM8K-format file."""

import json

import pytest
import torch

from posttrain.correctness import CorrectnessHead
from posttrain.data import Problem, extract_prediction, extract_reference, is_correct, load_problems
from posttrain.evaluate import Evaluator, evaluate, main as evaluate_main
from posttrain.ltpo import LTPOConfig
from posttrain.reasoner import load_reasoner
from posttrain.weaver import Weaver, WeaverConfig
from pretrain.data import Tokenizer


@pytest.mark.parametrize("text,expected", [
    ("so the total is #### 1,234", "1234"),
    ("#### -7", "-7"),
    ("#### 3.50", "3.5"),
    ("#### 12.0", "12"),
    ("#### $45 dollars", "45"),
    ("She pays $1,000.25 in all.", "1000.25"),
    ("first 3 then 4 then 5 apples", "5"),
    ("It is 18 km/h.", "18"),
    ("-.5 of it", "-0.5"),
    ("no number at all", None),
    ("#### none, but 42 later", "42"),
])
def test_answer_extraction(text, expected):
    assert extract_prediction(text) == expected


def test_reference_and_correctness():
    assert extract_reference("work\n#### 1,200") == "1200"
    gsm = Problem("Question: q\nAnswer:", " ...", "1200")
    assert is_correct("so #### 1,200 dollars", gsm) and not is_correct("#### 1201", gsm)
    word = Problem("mano 1 : + 2 3 =", " 5", "5", one_word=True)
    assert is_correct(" 5 mano", word) and not is_correct(" 55", word)


@pytest.fixture
def tiny_gsm8k(tmp_path):
    path = tmp_path / "gsm.jsonl"
    rows = [{"question": f"What is {a} plus {b}?", "answer": f"{a} + {b} = {a + b}\n#### {a + b:,}"}
            for a, b in ((2, 3), (1200, 40), (7, 8))]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("kind", ["looplm", "llama"])
def test_the_four_row_table_on_a_tiny_model(kind, reasoner_dir, llama_dir, tiny_gsm8k, tmp_path):
    reasoner_dir = reasoner_dir if kind == "looplm" else llama_dir
    reasoner = load_reasoner(reasoner_dir)
    torch.manual_seed(0)
    weaver = Weaver(reasoner, WeaverConfig(num_latents=2, lora_r=4))
    head = CorrectnessHead(64)
    weaver.save(tmp_path / "weaver")
    head.save(tmp_path / "head")
    problems = load_problems(str(tiny_gsm8k))
    assert [p.answer for p in problems] == ["5", "1240", "15"]
    evaluator = Evaluator(reasoner, Tokenizer(reasoner_dir / "tokenizer.model"), weaver, head,
                          max_new_tokens=6, ltpo=LTPOConfig(steps=3))
    table, outputs = evaluate(evaluator, problems, ["vanilla", "weaver", "ltpo", "correctness_ltpo"], batch=2,
                              progress=False)
    assert [r["setting"] for r in table] == ["Vanilla", "+ Weaver", "+ Weaver + LTPO", "+ Weaver + Correctness-LTPO"]
    for row in table:
        assert row["total"] == 3 and 0 <= row["correct"] <= 3 and row["seconds_per_problem"] > 0
    assert table[0]["avg_ltpo_steps"] == 0 and table[2]["avg_ltpo_steps"] == 3
    assert 0 < table[3]["avg_ltpo_steps"] <= 3
    for row, results in outputs.items():
        assert len(results) == 3
        assert all(r["correct"] == (r["prediction"] == r["reference"]) for r in results)
    # the command writes the same table and the per-problem outputs
    evaluate_main(["--reasoner", str(reasoner_dir), "--weaver", str(tmp_path / "weaver"), "--head",
                   str(tmp_path / "head"), "--data", str(tiny_gsm8k), "--max-new-tokens", "4", "--ltpo-steps", "2",
                   "--output", str(tmp_path / "out")])
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert len(saved["table"]) == 4 and set(json.loads((tmp_path / "out" / "outputs.json").read_text())) == {
        "vanilla", "weaver", "ltpo", "correctness_ltpo"}
