"""Answer extraction, the bootstrap interval, and the evaluation table on a tiny model and a tiny GSM8K-format file."""

import json

import pytest
import torch
from safetensors.torch import save_file

from posttrain.correctness import CorrectnessHead
from posttrain.data import Problem, extract_prediction, extract_reference, is_correct, load_problems
from posttrain.evaluate import ROW_KEYS, Evaluator, bootstrap_interval, evaluate, main as evaluate_main, table_rows
from posttrain.ltpo import LTPOConfig
from posttrain.reasoner import load_reasoner
from posttrain.trigger import LearnedTrigger
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
def test_the_table_on_a_tiny_model(kind, reasoner_dir, llama_dir, tiny_gsm8k, tmp_path):
    reasoner_dir = reasoner_dir if kind == "looplm" else llama_dir
    reasoner = load_reasoner(reasoner_dir)
    torch.manual_seed(0)
    weaver, grpo_weaver = (Weaver(reasoner, WeaverConfig(num_latents=2, lora_r=4)) for _ in range(2))
    head, joint_head, trigger = CorrectnessHead(64), CorrectnessHead(64), LearnedTrigger(64, sample=False)
    weaver.save(tmp_path / "weaver")
    grpo_weaver.save(tmp_path / "grpo_weaver")
    head.save(tmp_path / "head")
    joint_head.save(tmp_path / "joint_head")
    (tmp_path / "trigger").mkdir()
    save_file(trigger.state_dict(), tmp_path / "trigger" / "trigger.safetensors")
    problems = load_problems(str(tiny_gsm8k))
    assert [p.answer for p in problems] == ["5", "1240", "15"]
    tok = Tokenizer(reasoner_dir / "tokenizer.model")
    # every token is a delimiter, so inference augmentation fires as often as allowed
    evaluator = Evaluator(reasoner, tok, max_new_tokens=6, ltpo=LTPOConfig(steps=3), num_latents=2,
                          delimiters=[tok.decode([i])[-1:] or "x" for i in range(tok.vocab_size)])
    rows = table_rows(weaver, grpo_weaver, trigger, head, joint_head, max_insertions=2)
    assert [r.key for r in rows] == ["vanilla", "weaver_prompt", "weaver", "trigger", "grpo", "ltpo",
                                     "correctness_ltpo", "joint_correctness_ltpo"] == list(ROW_KEYS)
    table, outputs = evaluate(evaluator, problems, rows, batch=2, progress=False)
    by = {r["row"]: r for r in table}
    for row in table:
        assert row["total"] == 3 and 0 <= row["correct"] <= 3 and row["seconds_per_problem"] > 0
        assert row["ci95"][0] <= row["accuracy"] <= row["ci95"][1]
    assert by["vanilla"]["avg_ltpo_steps"] == 0 and by["ltpo"]["avg_ltpo_steps"] == 3
    assert 0 < by["correctness_ltpo"]["avg_ltpo_steps"] <= 3
    assert by["vanilla"]["avg_insertions"] == by["weaver_prompt"]["avg_insertions"] == 0
    assert 0 < by["weaver"]["avg_insertions"] <= 2  # nearly every token is a delimiter; at most M = 2
    assert all(r["insertions"] <= 2 for results in outputs.values() for r in results)
    for row, results in outputs.items():
        assert len(results) == 3
        assert all(r["correct"] == (r["prediction"] == r["reference"]) for r in results)
    # the command writes the same table and the per-problem outputs
    evaluate_main(["--reasoner", str(reasoner_dir), "--weaver", str(tmp_path / "weaver"), "--grpo-weaver",
                   str(tmp_path / "grpo_weaver"), "--head", str(tmp_path / "head"), "--joint-head",
                   str(tmp_path / "joint_head"), "--trigger", str(tmp_path / "trigger"), "--data", str(tiny_gsm8k),
                   "--max-new-tokens", "4", "--ltpo-steps", "2", "--output", str(tmp_path / "out")])
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [r["row"] for r in saved["table"]] == [r.key for r in rows]
    assert set(json.loads((tmp_path / "out" / "outputs.json").read_text())) == {r.key for r in rows}
    with pytest.raises(SystemExit, match="unknown --rows"):
        evaluate_main(["--reasoner", str(reasoner_dir), "--rows", "weaver,grop", "--data", str(tiny_gsm8k),
                       "--output", str(tmp_path / "out2")])
    with pytest.raises(SystemExit, match="--joint-head is used with --grpo-weaver"):
        evaluate_main(["--reasoner", str(reasoner_dir), "--joint-head", str(tmp_path / "joint_head"),
                       "--data", str(tiny_gsm8k), "--output", str(tmp_path / "out2")])
    with pytest.raises(SystemExit, match="grpo"):
        evaluate_main(["--reasoner", str(reasoner_dir), "--weaver", str(tmp_path / "weaver"), "--rows", "grpo",
                       "--data", str(tiny_gsm8k), "--output", str(tmp_path / "out2")])


def test_bootstrap_interval_on_known_cases():
    assert bootstrap_interval([True] * 50) == (1.0, 1.0)
    assert bootstrap_interval([]) == (0.0, 0.0)
    # 200 of 400: the normal approximation gives 0.5 +- 1.96 * sqrt(0.25 / 400) = 0.5 +- 0.049
    lo, hi = bootstrap_interval([True, False] * 200)
    assert lo == pytest.approx(0.451, abs=0.008) and hi == pytest.approx(0.549, abs=0.008)
    lo, hi = bootstrap_interval([True] * 30 + [False] * 70, level=0.5)
    assert lo < 0.3 < hi and hi - lo == pytest.approx(2 * 0.674 * (0.21 / 100) ** 0.5, abs=0.02)
    # paired: 40 problems gained, 10 lost of 400 -> mean difference 0.075, sd of the differences
    # sqrt(50/400 - 0.075^2) = 0.346, so 0.075 +- 1.96 * 0.346 / 20 = [0.041, 0.109]
    base = [False] * 40 + [True] * 10 + [True] * 100 + [False] * 250
    new = [True] * 40 + [False] * 10 + [True] * 100 + [False] * 250
    lo, hi = bootstrap_interval(new, baseline=base)
    assert lo == pytest.approx(0.041, abs=0.008) and hi == pytest.approx(0.109, abs=0.008)
    assert bootstrap_interval(base, baseline=base) == (0.0, 0.0)
