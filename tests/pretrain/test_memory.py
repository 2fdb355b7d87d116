"""The memory estimate of pretrain/memory.py: exact parameter counts, ZeRO/TP/SP divisions, and the
activations of a looped model scaling with T, the tokens per rank and activation checkpointing."""

import pytest

from looplm import LoopLMForCausalLM, preset_config
from pretrain.config import load_config
from pretrain.memory import estimate, main, parameter_counts

REPO_CONFIG = "configs/ouro_1p4b_longctx.yaml"


def config(**overrides):
    return load_config(REPO_CONFIG, [f"{k}={v}" for k, v in overrides.items()])


def test_parameter_counts_are_the_models():
    c = preset_config("tiny")
    model = LoopLMForCausalLM(c)
    total, split = parameter_counts(c)
    assert total == sum(p.numel() for p in model.parameters())
    layer = model.model.layers[0]
    assert split == c.num_hidden_layers * sum(p.numel() for n, p in layer.named_parameters() if "proj" in n)


def test_zero_stages_divide_the_model_states_over_the_replicas():
    c = preset_config("ouro-1.4b")
    e = {z: estimate(config(**{"train.zero_stage": z}), c, 64) for z in (0, 1, 2, 3)}
    total = e[0].parameters
    assert e[0].weights == e[0].gradients == 2 * total and e[0].optimizer == 12 * total  # bf16 + fp32 AdamW
    assert e[1].optimizer == pytest.approx(e[0].optimizer / 64)
    assert e[2].gradients == pytest.approx(e[0].gradients / 64) and e[2].weights == e[0].weights
    assert e[3].weights == pytest.approx(e[0].weights / 64)


def test_activations_follow_passes_tokens_and_checkpointing():
    c = preset_config("ouro-1.4b")
    base = estimate(config(**{"train.sequence_parallel": 1, "train.global_batch": 64}), c, 64)
    split = estimate(config(), c, 64)  # sequence_parallel 8
    assert split.activations == pytest.approx(base.activations / 8)
    deeper = preset_config("ouro-1.4b", total_ut_steps=8)
    assert estimate(config(), deeper, 64).activations == pytest.approx(2 * split.activations, rel=0.15)
    full = estimate(config(**{"train.activation_checkpointing": False}), c, 64)
    assert full.activations > 5 * split.activations


def test_tensor_parallel_splits_the_layer_projections_only():
    c = preset_config("ouro-1.4b")
    one = estimate(config(**{"train.sequence_parallel": 1, "train.global_batch": 64, "train.zero_stage": 0}), c, 64)
    two = estimate(config(**{"train.sequence_parallel": 1, "train.tensor_parallel": 2, "train.global_batch": 32,
                             "train.zero_stage": 0}), c, 64)
    _, split = parameter_counts(c)
    assert one.weights - two.weights == pytest.approx(2 * split / 2)


def test_the_command_prints_the_estimate(capsys):
    main(["--config", REPO_CONFIG, "--world-size", "64"])
    out = capsys.readouterr().out
    assert out.startswith("memory estimate per GPU:") and "1,434,652,673 parameters" in out
