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


def test_tiled_mlp_gives_the_plain_losses_and_gradients():
    """train.tiled_mlp (DeepSpeed's TiledMLP over the sequence): same loss and gradients as the plain MLP."""
    import torch

    from pretrain.parallel import tile_mlps

    c = preset_config("tiny", vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, total_ut_steps=3)
    ids = torch.randint(0, 128, (2, 48))
    runs = []
    for tiles in (1, 4):
        torch.manual_seed(0)
        model = LoopLMForCausalLM(c)
        if tiles > 1:
            tile_mlps(model, tiles)
        loss = model(ids, labels=ids).loss
        loss.backward()
        runs.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (plain, g_plain), (tiled, g_tiled) = runs
    torch.testing.assert_close(tiled, plain, rtol=1e-6, atol=0)
    for name in g_plain:
        torch.testing.assert_close(g_tiled[name], g_plain[name], rtol=1e-5, atol=1e-7, msg=name)


def test_tiled_mlp_removes_the_mlp_intermediates_from_the_estimate():
    c = preset_config("ouro-1.4b")
    plain = estimate(config(**{"train.activation_checkpointing": False}), c, 64)
    tiled = estimate(config(**{"train.activation_checkpointing": False, "train.tiled_mlp": 4}), c, 64)
    tokens = 65536 // 8
    saved = c.total_ut_steps * c.num_hidden_layers * 4 * c.intermediate_size * 2 * tokens
    assert plain.activations - tiled.activations == pytest.approx(saved)
