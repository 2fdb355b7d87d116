"""The post-training driver: the weaver's controls differ from it only in the latents, the
FLOP-matched control's steps follow from a hand count, and the table's rows pair what they say."""

import json

import pytest

from experiments.posttrain_word import FULL, METHODS, POST, QUICK, sft_cost, sft_overrides, table
from helpers.training import flatten
from posttrain.config import load_config


@pytest.mark.parametrize("seed", [1, 2])
def test_the_controls_differ_from_the_weaver_only_in_the_latents(seed):
    def cfg(method):
        from dataclasses import asdict

        return flatten(asdict(load_config("configs/posttrain_sft.yaml", [*POST, "reasoner.path=r", "data.train=t",
                                                                         *sft_overrides(method, seed)])))

    weaver = cfg("weaver")
    for control in set(METHODS) - {"weaver"}:
        other = cfg(control)
        assert {k for k in other if other[k] != weaver[k]} == {"weaver.latents"}
    assert {cfg(m)["weaver.latents"] for m in METHODS} == {"woven", "none", "pause"}
    assert QUICK.seeds != FULL.seeds[:1] and len(FULL.seeds) >= 3  # intervals over seeds in both


def test_the_flop_matched_steps_follow_a_hand_count(tmp_path):
    """Two problems of known token lengths: the positions the weaver's SFT processes, counted by hand."""
    import sentencepiece as spm

    from helpers.training import REPO

    rows = [{"question": "Tom has 2 pens .", "answer": "2 + 1 = 3 .\n#### 3"},
            {"question": "Ann has 4 cards .", "answer": "4 - 1 = 3 .\n3 * 2 = 6 .\n#### 6"}]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    words = "Question: Answer: Tom Ann has pens cards . + - * = #### 1 2 3 4 6".split()
    (tmp_path / "corpus.txt").write_text("\n".join(words * 20))
    spm.SentencePieceTrainer.train(input=str(tmp_path / "corpus.txt"), model_prefix=str(tmp_path / "tokenizer"),
                                   vocab_size=40, hard_vocab_limit=False, user_defined_symbols=["\n"], model_type="word",
                                   bos_id=-1, eos_id=1, pad_id=0, unk_id=2)
    from posttrain.data import load_problems
    from posttrain.reasoner import load_tokenizer

    tok = load_tokenizer(tmp_path, tmp_path / "tokenizer.model")
    total, K = 0, 3
    for p in load_problems(str(tmp_path / "p.jsonl")):
        P, A = len(tok.encode(p.prompt)), len(tok.encode(p.solution)) + 1
        newlines = [i for i, t in enumerate(tok.encode(p.solution)) if tok.decode([t]).endswith("\n")]
        reasoner = P + K + A + K * len(newlines)
        weaver = (P + K) + sum(P + K * (j + 1) + cut + 1 + K for j, cut in enumerate(newlines))
        total += reasoner + weaver
    got = sft_cost(tmp_path / "p.jsonl", tmp_path, steps=100, batch=8, latents=K, max_insertions=5,
                   tokenizer=tmp_path / "tokenizer.model")
    assert got["sft_positions_per_example"] == total / 2
    from pretrain.config import load_config as pretrain_config

    c = pretrain_config(REPO / "configs/experiments/word_reasoner.yaml")
    assert got["pretraining_steps"] == -(-2 * (total / 2) * 100 * 8 // (3 * c.train.global_batch * c.data.seq_len))


def test_the_table_pairs_rows_by_seed_and_problem(tmp_path):
    """Hand-made correctness: the weaver right on problems 0-5 of 10 in both seeds, vanilla on 0-3, the
    controls on 0-4: every paired difference is exact and its interval has zero width where the
    difference is the same in every resample."""
    problems = [{"question": f"q{i}", "answer": f"#### {i % 3}"} for i in range(10)]
    for split in ("train", "test"):
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in problems))
    files = {"gsm_train": tmp_path / "train.jsonl", "gsm_test": tmp_path / "test.jsonl"}

    def right(n, size=10):
        return [1] * n + [0] * (size - n)

    seed = {"vanilla": right(4), "weaver_prompt": right(4), "weaver": right(6), "trigger": right(6), "grpo": right(6),
            "ltpo_weaver": right(3, 5), "ltpo_ltpo": right(3, 5), "ltpo_correctness_ltpo": right(4, 5),
            "lora": right(5), "pause": right(5), "more_training": right(5)}
    out = table({1: seed, 2: seed}, "lora", files)
    rows = {r["row"]: r for r in out["rows"]}
    assert rows["weaver"]["accuracy"] == pytest.approx(0.6) and rows["weaver"]["n_seeds"] == 2
    assert rows["weaver"]["vs_vanilla"] == pytest.approx(0.2)
    assert rows["weaver"]["vs_control"] == pytest.approx(0.1) and rows["weaver"]["control"] == "lora"
    assert rows["ltpo_correctness_ltpo"]["vs_weaver"] == pytest.approx(0.2)
    assert rows["ltpo_ltpo"]["vs_weaver"] == 0 and rows["ltpo_ltpo"]["vs_weaver_ci95"] == [0, 0]
    assert rows["majority"]["accuracy"] == pytest.approx(0.4)  # answer 0: problems 0, 3, 6, 9
    assert rows["uniform"]["accuracy"] == pytest.approx(1 / 3)
    lo, hi = rows["weaver"]["vs_vanilla_ci95"]
    # problems 4 and 5 carry the difference: a resample's difference is Binomial(10, 0.2) / 10, whose
    # 2.5% and 97.5% quantiles are 0 and 0.5 (P(X = 0) = 0.107, P(X <= 4) = 0.967, P(X <= 5) = 0.994)
    assert lo == 0 and 0.4 <= hi <= 0.5
