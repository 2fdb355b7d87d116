"""benchmarks/gpu_check.py --tiny runs on CPU and its rows hold together: every attention backend
matches a naive fp64 attention on packed documents (and that reference is itself checked by hand),
the loss implementations train to the same loss, and the FLOP and MFU arithmetic matches a count of
the model's matmul weights."""

import pytest
import torch

from benchmarks.gpu_check import TINY, main, reference_attention
from looplm import LoopLMForCausalLM, preset_config


def test_the_reference_attention_is_document_causal_attention():
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 2, 5, 3), torch.randn(1, 1, 5, 3), torch.randn(1, 1, 5, 3)
    positions = torch.tensor([[0, 1, 2, 0, 1]])  # documents {0, 1, 2} and {3, 4}
    out = reference_attention(q, k, v, positions)
    for h in range(2):
        for i in range(5):
            keys = [j for j in range(5) if j <= i and (j >= 3) == (i >= 3)]
            w = torch.softmax(torch.stack([q[0, h, i] @ k[0, 0, j] for j in keys]).double() / 3 ** 0.5, 0)
            expected = sum(wj * v[0, 0, j].double() for wj, j in zip(w, keys))
            torch.testing.assert_close(out[0, i, h], expected)


def test_gpu_check_tiny_runs_on_cpu_and_its_variants_agree(capsys):
    rows = main(["--tiny", "--no-compile", "--repeats", "1"])
    table = capsys.readouterr().out
    assert "| sdpa |" in table and "| fused |" in table and "batch 8" in table
    attention = {r["name"]: r for r in rows if r["section"] == "attention"}
    assert set(attention) >= {"sdpa", "flex"} and all(r["max_abs_diff_out"] < 1e-5 for r in attention.values())
    training = {r["name"]: r for r in rows if r["section"] == "training"}
    assert abs(training["fused"]["loss"] - training["chunked"]["loss"]) < 1e-4  # same steps, same batch
    model = LoopLMForCausalLM(preset_config("tiny", **TINY))  # FLOPs counted from the model's own matmuls
    matmul = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    d_attn = TINY["num_attention_heads"] * TINY["head_dim"]  # scores and values: 2 x 2 x (S/2 keys) per layer
    per_token = 3 * TINY["total_ut_steps"] * (2 * matmul + 2 * TINY["num_hidden_layers"] * 128 * d_attn)
    for r in training.values():
        assert r["tflops"] == pytest.approx(per_token * r["tokens_per_s"] / 1e12, rel=1e-9)
        assert r["mfu"] == pytest.approx(r["tflops"] / 989.0, rel=1e-12)
    decode = [r for r in rows if r["section"] == "decode"]
    assert [r["name"] for r in decode] == ["batch 1", "batch 8", "continuous batch 8, 16 requests"]
    assert all(1 < r["mean_passes"] < 4 for r in decode)
    # skip vs dense, pass-asynchronous vs lock-step, continuous batching vs the fixed batch
    assert all(r["tokens_equal"] for r in decode)
