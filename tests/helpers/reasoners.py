"""Tiny random reasoners of both kinds: a LoopLM and a standard Llama causal LM."""

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from helpers.models import tiny_model
from posttrain.reasoner import freeze


def tiny_llama(seed: int = 0):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.2)
    return freeze(model)


def tiny_reasoner(kind: str, seed: int = 0):
    return freeze(tiny_model(seed=seed, total_ut_steps=2)) if kind == "looplm" else tiny_llama(seed)


KINDS = ["looplm", "llama"]
