"""An independent plain-PyTorch Ouro forward written from spec/ouro_format.md, for tests only:
eager attention with an explicit mask and repeated KV heads, no cache, no looplm code."""

import math

import torch
import torch.nn.functional as F


def _rms(x, w, eps):
    xf = x.float()
    return w * (xf / torch.sqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _rope(x, pos, theta):
    h = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, h, 2).float() / h)
    ang = pos[:, None].float() * inv[None]
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()
    x1, x2 = x[..., : h // 2], x[..., h // 2:]
    return x * cos + torch.cat([-x2, x1], -1) * sin


def reference_forward(sd: dict, cfg, ids: torch.Tensor, num_steps: int | None = None):
    """ids (S,) one sequence -> (per-pass normalised hidden states [T x (S, d)], gate logits (S, T))."""
    H, K, hd, eps = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.rms_norm_eps
    S = ids.shape[0]
    pos = torch.arange(S)
    allowed = torch.ones(S, S, dtype=torch.bool).tril()
    x = sd["model.embed_tokens.weight"][ids]
    hiddens, gates = [], []
    for _ in range(num_steps or cfg.total_ut_steps):
        for l in range(cfg.num_hidden_layers):
            p = f"model.layers.{l}."
            a = _rms(x, sd[p + "input_layernorm.weight"], eps)
            q = (a @ sd[p + "self_attn.q_proj.weight"].T).view(S, H, hd).transpose(0, 1)
            k = (a @ sd[p + "self_attn.k_proj.weight"].T).view(S, K, hd).transpose(0, 1)
            v = (a @ sd[p + "self_attn.v_proj.weight"].T).view(S, K, hd).transpose(0, 1)
            q, k = _rope(q, pos, cfg.rope_theta), _rope(k, pos, cfg.rope_theta)
            k, v = k.repeat_interleave(H // K, 0), v.repeat_interleave(H // K, 0)
            scores = (q @ k.transpose(-1, -2)) / math.sqrt(hd)
            att = F.softmax(scores.masked_fill(~allowed, float("-inf")).float(), -1).to(q.dtype) @ v
            att = att.transpose(0, 1).reshape(S, H * hd) @ sd[p + "self_attn.o_proj.weight"].T
            x = x + _rms(att, sd[p + "input_layernorm_2.weight"], eps)
            m = _rms(x, sd[p + "post_attention_layernorm.weight"], eps)
            m = (F.silu(m @ sd[p + "mlp.gate_proj.weight"].T) * (m @ sd[p + "mlp.up_proj.weight"].T))
            m = m @ sd[p + "mlp.down_proj.weight"].T
            x = x + _rms(m, sd[p + "post_attention_layernorm_2.weight"], eps)
        x = _rms(x, sd["model.norm.weight"], eps)
        hiddens.append(x)
        gates.append(x @ sd["model.early_exit_gate.weight"][0] + sd["model.early_exit_gate.bias"][0])
    return hiddens, torch.stack(gates, -1)
