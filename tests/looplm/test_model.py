"""Architecture against an independent forward, presets, packing, exits, dtype, save/load."""

import pytest
import torch

from helpers.models import tiny_model
from helpers.ouro_reference import reference_forward
from looplm import LoopLMConfig, LoopLMForCausalLM, preset_config


@pytest.mark.parametrize("preset,count", [("ouro-1.4b", 1_434_652_673), ("ouro-2.6b", 2_667_974_657)])
def test_preset_parameter_counts_match_the_released_models(preset, count):
    with torch.device("meta"):
        model = LoopLMForCausalLM(preset_config(preset))
    assert sum(p.numel() for p in model.parameters()) == count


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
@torch.no_grad()
def test_forward_matches_an_independent_implementation_with_gqa(kv_heads):
    model = tiny_model(num_key_value_heads=kv_heads)
    ids = torch.randint(0, 256, (2, 11))
    out = model(ids, output_hidden_states=True, use_cache=False)
    sd = model.state_dict()
    for b in range(2):
        hiddens, gates = reference_forward(sd, model.config, ids[b])
        for t, h in enumerate(hiddens):
            torch.testing.assert_close(out.hidden_states[t][b], h, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(out.gate_probs[b], torch.sigmoid(gates), atol=2e-5, rtol=0)


@torch.no_grad()
def test_depth_extrapolation_runs_more_passes_and_keeps_the_first_ones():
    model = tiny_model()
    ids = torch.randint(0, 256, (1, 9))
    four = model(ids, use_cache=False, output_hidden_states=True)
    six = model(ids, use_cache=False, output_hidden_states=True, num_steps=6)
    assert six.exit_probs.shape[-1] == 6 and len(six.hidden_states) == 6
    for t in range(4):
        torch.testing.assert_close(six.hidden_states[t], four.hidden_states[t])
    hiddens, _ = reference_forward(model.state_dict(), model.config, ids[0], num_steps=6)
    torch.testing.assert_close(six.hidden_states[5][0], hiddens[5], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(six.exit_probs.sum(-1), torch.ones(1, 9))


@torch.no_grad()
def test_exit_policies_select_the_documented_pass():
    model = tiny_model()
    ids = torch.randint(0, 256, (2, 10))
    out = model(ids, use_cache=False, output_step_logits=True, output_hidden_states=True)
    steps = model(ids, use_cache=False, exit_at_step=1)
    assert (steps.exit_steps == 1).all()
    torch.testing.assert_close(steps.logits, out.step_logits[1])
    # hidden-state difference: the first pass t >= 1 with ||h_t - h_{t-1}|| < eps, else the last
    diffs = torch.stack([(out.hidden_states[t] - out.hidden_states[t - 1]).norm(dim=-1) for t in (1, 2, 3)], -1)
    eps = float(diffs.median())
    expected = torch.full((2, 10), 3)
    for t in (2, 1):
        expected = torch.where(diffs[..., t - 1] < eps, torch.full_like(expected, t), expected)
    hd = model(ids, use_cache=False, exit_hidden_diff=eps)
    assert torch.equal(hd.exit_steps, expected)
    picked = torch.stack(out.step_logits, 2).gather(2, expected[..., None, None].expand(-1, -1, 1, 256)).squeeze(2)
    torch.testing.assert_close(hd.logits, picked)


@torch.no_grad()
def test_packed_documents_equal_documents_run_separately():
    model = tiny_model()
    a, b = torch.randint(0, 256, (1, 7)), torch.randint(0, 256, (1, 5))
    packed = torch.cat([a, b], 1)
    positions = torch.cat([torch.arange(7), torch.arange(5)])[None]
    out = model(packed, position_ids=positions, use_cache=False, output_step_logits=True)
    for doc, sl in ((a, slice(0, 7)), (b, slice(7, 12))):
        alone = model(doc, use_cache=False, output_step_logits=True)
        for t in range(4):
            torch.testing.assert_close(out.step_logits[t][:, sl], alone.step_logits[t], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(out.gate_probs[:, sl], alone.gate_probs, atol=1e-6, rtol=0)


@torch.no_grad()
def test_bf16_forward_is_close_to_fp32():
    model = tiny_model(std=0.05)
    ids = torch.randint(0, 256, (2, 16))
    ref = model(ids, use_cache=False, output_step_logits=True)
    half = model.to(torch.bfloat16)(ids, use_cache=False, output_step_logits=True)
    assert half.step_logits[-1].dtype == torch.bfloat16 and half.exit_probs.dtype == torch.float32
    for t in range(4):
        err = (half.step_logits[t].float() - ref.step_logits[t]).abs().max()
        assert err < 0.05 * ref.step_logits[t].abs().max() + 0.02, (t, err)
    assert (half.exit_probs - ref.exit_probs).abs().max() < 0.02


def test_save_load_round_trip(tmp_path):
    model = tiny_model(num_key_value_heads=2, entropy_beta=0.1, kv_sharing="last")
    model.save_pretrained(tmp_path)
    again = LoopLMForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(again.config, LoopLMConfig)
    assert again.config.entropy_beta == 0.1 and again.config.kv_sharing == "last"
    for key, value in model.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key
    ids = torch.randint(0, 256, (1, 6))
    with torch.no_grad():
        torch.testing.assert_close(again(ids, use_cache=False).logits, model(ids, use_cache=False).logits)


@pytest.mark.parametrize("bad,match", [
    (dict(kv_sharing="first"), "kv_sharing"),
    (dict(num_key_value_heads=3), "num_key_value_heads"),
    (dict(tie_word_embeddings=True), "tie_word_embeddings"),
    (dict(rope_scaling={"type": "linear", "factor": 2.0}), "rope_scaling"),
])
def test_bad_config_values_name_the_key(bad, match):
    with pytest.raises(ValueError, match=match):
        preset_config("tiny", **bad)


def test_embedding_init_std_sets_the_random_init_and_never_touches_loaded_weights(tmp_path):
    kw = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
              num_key_value_heads=2, head_dim=32)
    official = LoopLMForCausalLM(preset_config("tiny", **kw))
    scaled = LoopLMForCausalLM(preset_config("tiny", embedding_init_std=1.0, **kw))
    assert abs(official.model.embed_tokens.weight.std().item() - 0.02) < 0.002  # initializer_range
    assert abs(scaled.model.embed_tokens.weight.std().item() - 1.0) < 0.05
    assert abs(scaled.lm_head.weight.std().item() - 0.02) < 0.002  # only the embedding changes
    scaled.save_pretrained(tmp_path)
    loaded = LoopLMForCausalLM.from_pretrained(tmp_path)
    assert loaded.config.embedding_init_std == 1.0
    assert torch.equal(loaded.model.embed_tokens.weight, scaled.model.embed_tokens.weight)
