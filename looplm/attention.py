"""Attention behind one function: FlashAttention (varlen for packed documents) on a GPU when
installed, PyTorch SDPA otherwise. The mask is described once per forward (`AttentionMask`) and
shared by all N x T layer applications.

Masks cover three cases: plain causal; causal with left padding (2-D `attention_mask`, batched
generation); packed documents (position ids restart at 0 per document, no cache), where no token
attends across a document boundary.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

try:  # optional GPU dependency (requirements-gpu.txt)
    from flash_attn import flash_attn_func, flash_attn_varlen_func
except ImportError:  # pragma: no cover - depends on the machine
    flash_attn_func = flash_attn_varlen_func = None


def flash_available(device: torch.device, dtype: torch.dtype) -> bool:
    return flash_attn_func is not None and device.type == "cuda" and dtype in (torch.float16, torch.bfloat16)


@dataclass
class AttentionMask:
    """What a query may see. Exactly one of the fields describes the case:

    * nothing set: causal, queries are the last q_len of the keys (bottom-right aligned).
    * `dense` (B, 1, q, k) bool: explicit mask (padding); True = attend.
    * `cu_seqlens` (D + 1,) int32 + `max_seqlen`: packed documents in a (1, S) row, for flash;
      `dense` is also set for the SDPA path.
    """

    dense: torch.Tensor | None = None
    cu_seqlens: torch.Tensor | None = None
    max_seqlen: int | None = None

    def rows(self, index: torch.Tensor | None) -> "AttentionMask":
        """The mask restricted to batch rows `index` (None = all)."""
        if index is None or self.dense is None:
            return self
        return AttentionMask(self.dense[index])  # cu_seqlens describe all rows: SDPA takes the subset


def left_pad(sequences: list[list[int]], pad_id: int = 0, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token sequences left-padded to the longest: ids (B, S) and mask (B, S), 1 = real token."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(sequences):
        ids[i, width - len(s):], mask[i, width - len(s):] = torch.tensor(s, dtype=torch.long, device=device), 1
    return ids, mask


def position_ids_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Position ids (B, S) from an attention mask (B, S), 1 = real input: the number of real inputs
    before each one, so left padding and masked slots take no position. A masked slot gets the
    position of the real input before it (0 before the first); it is never attended."""
    return (mask.long().cumsum(-1) - 1).clamp_min(0)


def document_ids(position_ids: torch.Tensor) -> torch.Tensor | None:
    """(B, S) document index per token from position ids that restart at 0 per document, or None
    when every row is one document (positions never restart)."""
    starts = position_ids == 0
    starts[:, 0] = True
    if not starts[:, 1:].any():
        return None
    return starts.long().cumsum(-1)


def build_attention_mask(q_len: int, past_len: int, attention_mask: torch.Tensor | None,
                         position_ids: torch.Tensor | None) -> AttentionMask:
    """Describe the attention pattern of one forward.

    q_len: new tokens; past_len: cached tokens; attention_mask: (B, past_len + q_len) 1 = real token,
    0 = padding, or None; position_ids: (B, q_len), used to find packed documents when there is no
    padding mask and no cache.
    """
    if attention_mask is not None and not bool(attention_mask.all()):
        k_len = past_len + q_len
        if attention_mask.shape[-1] != k_len:
            raise ValueError(f"attention_mask has {attention_mask.shape[-1]} columns but the cache plus the new "
                             f"tokens hold {k_len}; pass a mask covering past and new tokens")
        keys = torch.arange(k_len, device=attention_mask.device)
        queries = keys[past_len:]
        causal = keys[None, :] <= queries[:, None]
        dense = causal[None] & attention_mask.bool()[:, None, :]
        # A padding query sees nothing; letting it see itself keeps SDPA free of NaN (its output is unused).
        dense = dense | (keys[None, None, :] == queries[None, :, None])
        return AttentionMask(dense=dense[:, None])
    if position_ids is not None and past_len == 0:
        docs = document_ids(position_ids)
        if docs is not None:
            same_doc = docs[:, :, None] == docs[:, None, :]
            causal = torch.ones(q_len, q_len, dtype=torch.bool, device=docs.device).tril()
            lengths = torch.unique_consecutive(docs.flatten() + docs.shape[1] * torch.arange(
                docs.shape[0], device=docs.device).repeat_interleave(docs.shape[1]), return_counts=True)[1]
            cu = F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
            return AttentionMask(dense=(same_doc & causal)[:, None], cu_seqlens=cu, max_seqlen=int(lengths.max()))
    return AttentionMask()


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask, backend: str) -> torch.Tensor:
    """Scaled dot-product attention with grouped-query heads.

    q: (B, H, q, h); k, v: (B, K, k, h) with H a multiple of K. Returns (B, q, H, h).
    backend: "auto" | "sdpa" | "flash"; flash handles the causal and packed cases, padding masks go to SDPA.
    """
    use_flash = backend != "sdpa" and flash_available(q.device, q.dtype) and (
        mask.dense is None or mask.cu_seqlens is not None)
    if backend == "flash" and not use_flash and not flash_available(q.device, q.dtype):
        raise RuntimeError("attention_backend='flash' needs flash-attn installed and fp16/bf16 tensors on a GPU; "
                           "install requirements-gpu.txt or use attention_backend='auto'")
    if use_flash:
        q_, k_, v_ = (x.transpose(1, 2) for x in (q, k, v))  # (B, len, heads, h)
        if mask.cu_seqlens is not None:
            out = flash_attn_varlen_func(q_.flatten(0, 1), k_.flatten(0, 1), v_.flatten(0, 1), mask.cu_seqlens,
                                         mask.cu_seqlens, mask.max_seqlen, mask.max_seqlen, causal=True)
            return out.view(q_.shape)
        return flash_attn_func(q_, k_, v_, causal=True)
    gqa = q.shape[1] != k.shape[1]
    if mask.dense is not None:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.dense, enable_gqa=gqa)
    elif q.shape[2] == k.shape[2]:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    elif q.shape[2] == 1:
        out = F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
    else:  # a chunk of new tokens after a cache: causal, aligned to the end of the keys
        past = k.shape[2] - q.shape[2]
        keep = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril(past)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, enable_gqa=gqa)
    return out.transpose(1, 2)
