"""The reasoner interface (left padding, positions from the mask, forwards on embeddings) against
hand-built tensors and unpadded runs; the config path of posttrain.evaluate / posttrain.head against
their flags."""

import json

import pytest
import torch

from helpers.reasoners import KINDS, tiny_reasoner
from looplm import position_ids_from_mask
from looplm.compat import output_cache
from posttrain.reasoner import forward_embeds, left_pad, prompt_embeds


def test_left_pad_and_positions_match_hand_built_tensors():
    ids, mask = left_pad([[5, 6, 7], [8], []], pad_id=2)
    assert torch.equal(ids, torch.tensor([[5, 6, 7], [2, 2, 8], [2, 2, 2]]))
    assert torch.equal(mask, torch.tensor([[1, 1, 1], [0, 0, 1], [0, 0, 0]]))
    assert ids.dtype == mask.dtype == torch.long
    # left padding takes no position; a masked slot inside a row repeats the position before it
    mask = torch.tensor([[0, 0, 1, 1, 0, 1], [1, 1, 1, 1, 1, 1]])
    assert torch.equal(position_ids_from_mask(mask), torch.tensor([[0, 0, 0, 1, 1, 2], [0, 1, 2, 3, 4, 5]]))
    assert torch.equal(position_ids_from_mask(mask.bool()), position_ids_from_mask(mask))


@pytest.mark.parametrize("kind", KINDS)
def test_forward_embeds_on_left_padded_prompts_equals_each_prompt_alone(kind):
    reasoner = tiny_reasoner(kind)
    prompts = [[5, 6, 7, 8], [9, 10]]
    with torch.no_grad():
        embeds, mask = prompt_embeds(reasoner, prompts)
        logits = forward_embeds(reasoner, embeds, mask).logits
        for row, prompt in enumerate(prompts):
            alone = reasoner(input_ids=torch.tensor([prompt]), use_cache=False).logits[0]
            torch.testing.assert_close(logits[row, -len(prompt):], alone, atol=1e-4, rtol=1e-4)
        # the last input alone after the cache of the others: the same as in the full forward
        prefix = forward_embeds(reasoner, embeds[:, :-1], mask[:, :-1], use_cache=True)
        cached = forward_embeds(reasoner, embeds[:, -1:], mask, output_cache(prefix), use_cache=True).logits
    torch.testing.assert_close(cached[:, -1], logits[:, -1], atol=1e-4, rtol=1e-4)


def test_saved_weaver_json_keeps_its_format(tmp_path):
    from posttrain.weaver import Weaver, WeaverConfig, load_weaver

    reasoner = tiny_reasoner("looplm")
    Weaver(reasoner, WeaverConfig(num_latents=2, lora_r=2, init_from="elsewhere")).save(tmp_path / "w")
    saved = json.loads((tmp_path / "w" / "weaver.json").read_text())
    assert set(saved) == {"num_latents", "lora_r", "lora_alpha", "lora_dropout", "lora_targets", "reasoner",
                          "reasoner_hidden_size", "latents"}
    assert load_weaver(reasoner, tmp_path / "w").config.num_latents == 2


# the flags of posttrain.evaluate as they were before the config path, with their defaults then
EVALUATE_DEFAULTS = {"tokenizer": None, "weaver": None, "trigger": None, "limit": None, "batch": 8,
                     "max_new_tokens": 256, "draft_tokens": None, "max_insertions": 5, "ltpo_steps": 10,
                     "ltpo_lr": 0.03, "ltpo_sigma": 0.1, "stop_at": 0.95, "confidence": "neg_logprob",
                     "answer_pattern": r"####\s*([^\n]+)"}
HEAD_DEFAULTS = {"tokenizer": None, "weaver": None, "problems": 400, "samples": 2, "max_new_tokens": 64,
                 "steps": 1000, "draft_tokens": 8, "max_insertions": 5}


def test_evaluate_reads_the_config_as_it_reads_the_flags(tmp_path):
    from posttrain.evaluate import arguments

    args, cfg = arguments(["--reasoner", "r", "--data", "d", "--output", "o"])
    assert {k: getattr(args, k) for k in EVALUATE_DEFAULTS} == EVALUATE_DEFAULTS
    assert cfg.augment.delimiters == [",", ".", "\n"] and cfg.eval.ltpo.top_k == 10

    flags = ["--reasoner", "r", "--weaver", "w", "--trigger", "t", "--data", "d.jsonl", "--limit", "7", "--batch", "3",
             "--max-new-tokens", "48", "--draft-tokens", "0", "--max-insertions", "2", "--delimiters", '["\\n"]',
             "--ltpo-steps", "4", "--ltpo-lr", "0.5", "--ltpo-sigma", "0.2", "--stop-at", "0.9", "--confidence",
             "probability", "--answer-pattern", r"answer:\s*(\S+)"]
    yaml_file = tmp_path / "eval.yaml"
    yaml_file.write_text("reasoner: {path: r}\nweaver: {init_from: w}\ntrigger: {init_from: t}\n"
                         "data: {eval: d.jsonl, max_eval: 7, answer_pattern: 'answer:\\s*(\\S+)'}\n"
                         "augment: {max_insertions: 2, delimiters: [\"\\n\"]}\n"
                         "eval: {batch: 3, max_new_tokens: 48, draft_tokens: 0, stop_at: 0.9,\n"
                         "       ltpo: {steps: 4, lr: 0.5, sigma: 0.2, confidence: probability}}\n")
    by_flags = arguments([*flags, "--output", "o"])
    by_config = arguments(["--config", str(yaml_file), "--output", "o"])
    by_overrides = arguments(["eval.ltpo.steps=4", "--config", str(yaml_file), "eval.batch=3", "--output", "o"])
    assert by_flags[1] == by_config[1] == by_overrides[1]

    def settings(args):
        return {k: v for k, v in vars(args).items() if k not in ("config", "overrides")}

    assert settings(by_flags[0]) == settings(by_config[0]) == settings(by_overrides[0])
    assert by_flags[0].answer_pattern == r"answer:\s*(\S+)" and by_flags[0].delimiters == ["\n"]
    # a flag overrides the file and the overrides
    args, cfg = arguments(["--config", str(yaml_file), "eval.ltpo.steps=6", "--ltpo-steps", "9", "--output", "o"])
    assert args.ltpo_steps == cfg.eval.ltpo.steps == 9 and cfg.eval.batch == 3


def test_head_reads_the_config_as_it_reads_the_flags(tmp_path):
    from posttrain.head import arguments

    args, cfg = arguments(["--reasoner", "r", "--data", "d", "--output", "o"])
    assert {k: getattr(args, k) for k in HEAD_DEFAULTS} == HEAD_DEFAULTS
    assert cfg.augment.delimiters == [",", ".", "\n"]
    flags = ["--reasoner", "r", "--weaver", "w", "--data", "d.jsonl", "--problems", "30", "--samples", "3",
             "--max-new-tokens", "12", "--steps", "20", "--draft-tokens", "all", "--max-insertions", "0",
             "--delimiters", '[" "]']
    yaml_file = tmp_path / "head.yaml"
    yaml_file.write_text("reasoner: {path: r}\nweaver: {init_from: w}\ndata: {train: d.jsonl}\n"
                         "augment: {max_insertions: 0, delimiters: [' ']}\n"
                         "head: {problems: 30, samples: 3, max_new_tokens: 12, steps: 20, draft_tokens: null}\n")
    by_flags, by_config = arguments([*flags, "--output", "o"]), arguments(["--config", str(yaml_file), "--output", "o"])
    assert by_flags[1] == by_config[1]
    assert by_flags[1].head.draft_tokens is None and by_flags[1].augment.delimiters == [" "]
    assert arguments(["--config", str(yaml_file), "--draft-tokens", "5", "--output", "o"])[1].head.draft_tokens == 5
