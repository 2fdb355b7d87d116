"""The official-format ouro_tiny checkpoint loads unchanged and reproduces the official outputs."""

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from looplm import LoopLMForCausalLM

# Tolerances suggested by the fixture's README for an fp32 re-implementation.
LOGITS = dict(atol=2e-4, rtol=1e-4)
GATES = dict(atol=2e-5, rtol=0)


@pytest.fixture
def official(ouro_tiny_dir):
    model = LoopLMForCausalLM.from_pretrained(ouro_tiny_dir).eval()
    return model, load_file(ouro_tiny_dir / "expected.safetensors")


def test_loads_official_state_dict_unchanged(ouro_tiny_dir):
    ours = LoopLMForCausalLM.from_pretrained(ouro_tiny_dir).state_dict()
    theirs = load_file(ouro_tiny_dir / "model.safetensors")
    assert set(ours) == set(theirs)
    for key, value in theirs.items():
        assert torch.equal(ours[key], value), key


def test_auto_class_loads_the_official_folder(ouro_tiny_dir):
    import looplm  # noqa: F401  (registers model_type "ouro")

    assert isinstance(AutoModelForCausalLM.from_pretrained(ouro_tiny_dir), LoopLMForCausalLM)


@torch.no_grad()
def test_per_pass_logits_gates_and_exit_pdf(official):
    model, exp = official
    out = model(exp["input_ids"], output_step_logits=True, output_hidden_states=True, use_cache=False)
    T = model.config.total_ut_steps
    assert len(out.step_logits) == T and out.gate_probs.shape == (2, 12, T)
    for t in range(T):
        torch.testing.assert_close(out.hidden_states[t], exp[f"hidden_step{t}"], atol=1e-4, rtol=0)
        torch.testing.assert_close(out.step_logits[t], exp[f"logits_step{t}"], **LOGITS)
        torch.testing.assert_close(out.gate_probs[..., t], exp[f"gate_step{t}"], **GATES)
    torch.testing.assert_close(out.exit_probs, exp["exit_pdf"], **GATES)


@torch.no_grad()
def test_exit_thresholds_select_the_official_steps(official):
    model, exp = official
    out = model(exp["input_ids"], use_cache=False)  # config early_exit_threshold = 1.0
    torch.testing.assert_close(out.logits, exp["final_logits"], **LOGITS)
    assert torch.equal(out.exit_steps, exp["exit_steps_threshold_1p0"])
    out = model(exp["input_ids"], use_cache=False, exit_threshold=0.5)
    torch.testing.assert_close(out.logits, exp["final_logits_threshold_0p5"], **LOGITS)
    assert torch.equal(out.exit_steps, exp["exit_steps_threshold_0p5"])


@torch.no_grad()
def test_weighted_exit_and_the_official_labels_loss(official):
    model, exp = official
    model.config.early_exit_threshold = None  # the official weighted branch is only reachable so
    out = model(exp["input_ids"], use_cache=False, use_weighted_exit=True)
    torch.testing.assert_close(out.logits, exp["weighted_logits"], **LOGITS)
    # The official labels loss is HF-shifted CE of the weighted logits (not our objective): recompute it.
    ce = F.cross_entropy(out.logits[:, :-1].reshape(-1, 256), exp["input_ids"][:, 1:].reshape(-1))
    torch.testing.assert_close(ce, exp["labels_loss"][0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("use_cache", [True, False])
def test_greedy_generation_matches_official(official, use_cache):
    model, exp = official
    ids = model.generate(exp["input_ids"][:1], max_new_tokens=8, do_sample=False, use_cache=use_cache)
    assert torch.equal(ids, exp["generated_ids"])


def test_saved_folder_keeps_the_official_format(official, tmp_path):
    model, exp = official
    model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["model_type"] == "ouro" and cfg["architectures"] == ["OuroForCausalLM"]
    for key in ("total_ut_steps", "early_exit_threshold", "head_dim", "rope_theta", "num_key_value_heads"):
        assert key in cfg
    saved = load_file(tmp_path / "model.safetensors")
    assert set(saved) == set(load_file(model.config.name_or_path + "/model.safetensors"))
    again = LoopLMForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(exp["input_ids"], use_cache=False).logits, exp["final_logits"], **LOGITS)
