"""Attention masks (documents, padding) and the FlashAttention/SDPA backends."""

import pytest
import torch

from helpers.models import tiny_model
from looplm.attention import attention, build_attention_mask, flash_attn_func


def test_packed_mask_never_crosses_documents():
    positions = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3]])
    mask = build_attention_mask(9, 0, None, positions)
    doc = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2])
    dense = mask.dense_mask()[0, 0]
    for i in range(9):
        for j in range(9):
            assert bool(dense[i, j]) == (j <= i and doc[i] == doc[j]), (i, j)
    assert mask.cu_seqlens.tolist() == [0, 3, 5, 9] and mask.max_seqlen == 4


def test_padding_mask_hides_pad_keys_and_keeps_pad_queries_finite():
    am = torch.tensor([[0, 0, 1, 1, 1]])
    dense = build_attention_mask(2, 3, am, None).dense[0, 0]  # 3 cached + 2 new tokens
    assert dense.tolist() == [[False, False, True, True, False], [False, False, True, True, True]]
    prefill = build_attention_mask(5, 0, am, None).dense[0, 0]
    assert prefill[0].tolist() == [True, False, False, False, False]  # a pad query sees only itself
    assert not prefill[2:, :2].any()


def test_flash_backend_request_without_flash_is_a_clear_error():
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(RuntimeError, match="flash-attn"):
        attention(q, q, q, build_attention_mask(4, 0, None, None), "flash")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or flash_attn_func is None, reason="needs CUDA and flash-attn")
@torch.no_grad()
def test_flash_and_sdpa_agree_on_causal_and_packed_batches():
    model = tiny_model(num_key_value_heads=2).cuda().to(torch.bfloat16)
    ids = torch.randint(0, 256, (1, 64), device="cuda")
    positions = torch.cat([torch.arange(40), torch.arange(24)])[None].cuda()
    results = {}
    for backend in ("sdpa", "flash"):
        for layer in model.model.layers:
            layer.self_attn.backend = backend
        results[backend] = [model(ids, use_cache=False).logits.float(),
                            model(ids, position_ids=positions, use_cache=False).logits.float()]
    for a, b in zip(results["sdpa"], results["flash"]):
        torch.testing.assert_close(a, b, atol=5e-2, rtol=5e-2)


@pytest.mark.parametrize("kv_heads", [4, 2])
@torch.no_grad()
def test_flex_attention_equals_sdpa_on_packed_documents(kv_heads):
    """FlexAttention's document-causal block mask against SDPA's dense mask through every pass and
    layer: the same logits and per-pass losses. (FlexAttention has no backward on CPU: gradients are
    compared on a GPU by benchmarks/gpu_check.py.)"""
    ids = torch.randint(0, 256, (2, 24))
    positions = torch.cat([torch.arange(10), torch.arange(9), torch.arange(5)])[None].repeat(2, 1)
    positions[1] = torch.cat([torch.arange(4), torch.arange(20)])
    outs = {backend: tiny_model(num_key_value_heads=kv_heads, attention_backend=backend)(
        ids, position_ids=positions, labels=ids, compute_logits=True, use_cache=False) for backend in ("flex", "sdpa")}
    torch.testing.assert_close(outs["flex"].logits, outs["sdpa"].logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(outs["flex"].step_losses, outs["sdpa"].step_losses, atol=1e-5, rtol=1e-5)


def test_a_packed_batch_builds_no_dense_mask_on_the_flex_path():
    positions = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2]])
    mask = build_attention_mask(8, 0, None, positions)
    q = torch.randn(1, 2, 8, 16)
    out = attention(q, q, q, mask, "flex")
    assert mask.dense is None  # only the SDPA path materialises (B, 1, S, S)
    torch.testing.assert_close(out, attention(q, q, q, mask, "sdpa"), atol=1e-5, rtol=1e-5)
    assert mask.dense is not None
