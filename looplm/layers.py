"""The building blocks of one Ouro decoder layer, as the official code computes them
(spec/ouro_format.md section 3): RMSNorm, half-split RoPE, SwiGLU, grouped-query attention, and
the four-norm "sandwich" layer."""

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer

from .attention import AttentionMask, attention
from .cache import CacheSlot


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32, round back to the input dtype, then scale (the official order; it matters in bf16).
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class RotaryEmbedding(nn.Module):
    # No inv_freq buffer: recomputing h/2 numbers once per forward is free, and a non-persistent
    # buffer would be left uninitialised when a checkpoint is loaded onto the meta device.
    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        self.head_dim, self.theta = head_dim, theta

    @torch.no_grad()
    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids (B, S) -> cos, sin (B, 1, S, head_dim) in `dtype`; tables built in fp32."""
        exponents = torch.arange(0, self.head_dim, 2, dtype=torch.int64, device=position_ids.device).float()
        inv_freq = 1.0 / (self.theta ** (exponents / self.head_dim))
        with torch.autocast(device_type=position_ids.device.type, enabled=False):
            freqs = position_ids[..., None].float() * inv_freq
            emb = torch.cat([freqs, freqs], dim=-1)
            return emb.cos()[:, None].to(dtype), emb.sin()[:, None].to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + rotate_half(x) * sin


class MLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class SelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = (
            config.num_attention_heads, config.num_key_value_heads, config.head_dim)
        d = config.hidden_size
        self.q_proj = nn.Linear(d, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(d, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(d, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, d, bias=False)
        self.backend = config.attention_backend
        # Replaces the attention call when set: fn(q, k, v, mask) with q (R, H, S, h) -> (R, S, H, h).
        # Sequence parallelism installs DeepSpeed's all-to-all around it here (pretrain/parallel.py).
        self.attention_fn = None

    def forward(self, x, rope, mask: AttentionMask, cache: CacheSlot | None = None):
        """x (R, S, d); rope = (cos, sin); cache: where this layer application's keys go and what it
        attends to (None: this call's keys only). With `cache.rows` set, x holds those rows of a
        batch of B; attention runs over all B rows' cached keys (read in place, no gather) and the
        computed rows are kept. Returns the attention output (R, S, d)."""
        R, S, _ = x.shape
        q = self.q_proj(x).view(R, S, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(R, S, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(R, S, self.num_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = rope
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        rows = None
        if cache is not None:
            k, v = cache.update(k, v)
            rows = cache.rows
            if rows is not None:
                q = q.new_zeros(k.shape[0], *q.shape[1:]).index_copy_(0, rows, q)
        if self.attention_fn is None:
            out = attention(q, k, v, mask, self.backend)
        else:
            out = self.attention_fn(q, k, v, mask)
        if rows is not None:
            out = out[rows]
        return self.o_proj(out.reshape(R, S, -1))


class DecoderLayer(GradientCheckpointingLayer):
    """Ouro "sandwich" layer: x += norm2(attn(norm1(x))); x += norm4(mlp(norm3(x)))."""

    def __init__(self, config):
        super().__init__()
        d, eps = config.hidden_size, config.rms_norm_eps
        self.self_attn = SelfAttention(config)
        self.mlp = MLP(d, config.intermediate_size)
        self.input_layernorm = RMSNorm(d, eps)
        self.input_layernorm_2 = RMSNorm(d, eps)
        self.post_attention_layernorm = RMSNorm(d, eps)
        self.post_attention_layernorm_2 = RMSNorm(d, eps)

    def forward(self, x, rope=None, mask=None, cache=None):
        x = x + self.input_layernorm_2(self.self_attn(self.input_layernorm(x), rope, mask, cache))
        return x + self.post_attention_layernorm_2(self.mlp(self.post_attention_layernorm(x)))
