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
