"""Tiny random LoopLM models for tests."""

import torch

from looplm import LoopLMForCausalLM, preset_config


def tiny_model(seed: int = 0, std: float = 0.2, **overrides) -> LoopLMForCausalLM:
    """A tiny model with weights large enough (normal(0, std)) that every pass, gate and norm matters."""
    torch.manual_seed(seed)
    config = preset_config("tiny", **overrides)
    model = LoopLMForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2:
                p.normal_(0, std)
            elif "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0, 0.5)
    return model.eval()


def parallel_test_model(seed: int = 0) -> LoopLMForCausalLM:
    """The model of the 2-rank parallelism checks: 4 heads, 2 KV heads, MLP width 128 (split in 2)."""
    torch.manual_seed(seed)
    return LoopLMForCausalLM(preset_config("tiny", vocab_size=128, hidden_size=64, intermediate_size=128,
                                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                           head_dim=16, total_ut_steps=3))


def packed_batch(seed: int = 0) -> dict:
    """2 rows x 32 tokens of packed documents (5 + 14 + 13 and 20 + 12 tokens): input_ids, position_ids
    restarting per document, labels with every document's first token and one inner target ignored."""
    S = 32
    ids = torch.randint(0, 128, (2, S), generator=torch.Generator().manual_seed(seed))
    positions = torch.cat([torch.arange(n) for n in (5, 14, 13)] + [torch.arange(n) for n in (20, 12)]).view(2, S)
    labels = torch.where(positions == 0, -100, ids)
    labels[0, 7] = -100
    return {"input_ids": ids, "position_ids": positions, "labels": labels}
