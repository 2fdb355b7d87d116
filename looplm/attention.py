"""Attention behind one function: FlashAttention (varlen for packed documents) on a GPU when
installed; PyTorch FlexAttention for packed documents on a GPU without flash-attn (a document-causal
block mask, compiled); PyTorch SDPA otherwise. The mask is described once per forward
(`AttentionMask`) and shared by all N x T layer applications; the dense (B, 1, S, S) form of a
packed mask is built only if the SDPA path asks for it.

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

try:  # PyTorch >= 2.5
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
except ImportError:  # pragma: no cover - depends on the torch release
    create_block_mask = flex_attention = None

_compiled_flex = None


def flash_available(device: torch.device, dtype: torch.dtype) -> bool:
    return flash_attn_func is not None and device.type == "cuda" and dtype in (torch.float16, torch.bfloat16)


def _flex(q, k, v, block_mask, enable_gqa):
    """FlexAttention, compiled on a GPU (its eager form is a slow reference; on CPU it is what tests use)."""
    global _compiled_flex
    if q.device.type != "cuda":
        return flex_attention(q, k, v, block_mask=block_mask, enable_gqa=enable_gqa)
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex(q, k, v, block_mask=block_mask, enable_gqa=enable_gqa)


@dataclass
class AttentionMask:
    """What a query may see:

    * nothing set: causal, queries are the last q_len of the keys (bottom-right aligned).
    * `dense` (B, 1, q, k) bool: explicit mask (padding); True = attend.
    * `docs` (B, S) document index per token: packed documents, causal within each, no cache; with
      `cu_seqlens` (D + 1,) int32 + `max_seqlen` for flash varlen. `dense` and `block_mask()` (flex)
      derive from `docs` on first use and are kept for the other layer applications.
    """

    dense: torch.Tensor | None = None
    docs: torch.Tensor | None = None
    cu_seqlens: torch.Tensor | None = None
    max_seqlen: int | None = None
    _block_mask: object = None
    _additive: dict | None = None

    def dense_mask(self) -> torch.Tensor | None:
        """The (B, 1, q, k) boolean mask of the SDPA path (None: plain causal)."""
        if self.dense is None and self.docs is not None:
            d = self.docs
            causal = torch.ones(d.shape[1], d.shape[1], dtype=torch.bool, device=d.device).tril()
            self.dense = ((d[:, :, None] == d[:, None, :]) & causal)[:, None]
        return self.dense

    def additive_mask(self, dtype: torch.dtype) -> torch.Tensor | None:
        """The dense mask as SDPA's additive float mask (0 = attend, -inf = not), built once per dtype and
        shared by every layer application: SDPA converts a boolean mask to this form on each call and
        keeps the copy for backward, which would hold N x T copies of a (B, 1, q, k) float tensor."""
        dense = self.dense_mask()
        if dense is None:
            return None
        if self._additive is None:
            self._additive = {}
        if dtype not in self._additive:
            zero = torch.zeros((), dtype=dtype, device=dense.device)
            self._additive[dtype] = torch.where(dense, zero, torch.finfo(dtype).min)
        return self._additive[dtype]

    def block_mask(self):
        """FlexAttention's document-causal block mask (packed documents only)."""
        if self._block_mask is None:
            docs = self.docs

            def document_causal(b, h, q_idx, kv_idx):
                return (docs[b, q_idx] == docs[b, kv_idx]) & (q_idx >= kv_idx)

            self._block_mask = create_block_mask(document_causal, docs.shape[0], None, docs.shape[1], docs.shape[1],
                                                 device=docs.device)
        return self._block_mask

    def rows(self, index: torch.Tensor | None) -> "AttentionMask":
        """The mask restricted to batch rows `index` (None = all)."""
        if index is None or (self.dense is None and self.docs is None):
            return self
        if self.docs is not None:  # cu_seqlens describe all rows: the subset goes to SDPA or flex
            return AttentionMask(docs=self.docs[index])
        return AttentionMask(self.dense[index])


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
            lengths = torch.unique_consecutive(docs.flatten() + docs.shape[1] * torch.arange(
                docs.shape[0], device=docs.device).repeat_interleave(docs.shape[1]), return_counts=True)[1]
            cu = F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
            return AttentionMask(docs=docs, cu_seqlens=cu, max_seqlen=int(lengths.max()))
    return AttentionMask()


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask, backend: str) -> torch.Tensor:
    """Scaled dot-product attention with grouped-query heads.

    q: (B, H, q, h); k, v: (B, K, k, h) with H a multiple of K. Returns (B, q, H, h).
    backend: "auto" | "sdpa" | "flash" | "flex". flash handles the causal and packed cases; flex the
    packed case (auto: on a GPU without flash-attn); padding masks and the rest go to SDPA.
    """
    use_flash = backend in ("auto", "flash") and flash_available(q.device, q.dtype) and (
        mask.dense is None or mask.cu_seqlens is not None)
    if backend == "flash" and not use_flash and not flash_available(q.device, q.dtype):
        raise RuntimeError("attention_backend='flash' needs flash-attn installed and fp16/bf16 tensors on a GPU; "
                           "install requirements-gpu.txt or use attention_backend='auto'")
    if backend == "flex" and flex_attention is None:
        raise RuntimeError("attention_backend='flex' needs torch.nn.attention.flex_attention (PyTorch >= 2.5); "
                           "use attention_backend='auto'")
    gqa = q.shape[1] != k.shape[1]
    packed = mask.docs is not None and q.shape[2] == k.shape[2]
    if not use_flash and packed and flex_attention is not None and (
            backend == "flex" or (backend == "auto" and q.device.type == "cuda")):
        return _flex(q, k, v, mask.block_mask(), gqa).transpose(1, 2)
    if use_flash:
        q_, k_, v_ = (x.transpose(1, 2) for x in (q, k, v))  # (B, len, heads, h)
        if mask.cu_seqlens is not None:
            out = flash_attn_varlen_func(q_.flatten(0, 1), k_.flatten(0, 1), v_.flatten(0, 1), mask.cu_seqlens,
                                         mask.cu_seqlens, mask.max_seqlen, mask.max_seqlen, causal=True)
            return out.view(q_.shape)
        return flash_attn_func(q_, k_, v_, causal=True)
    dense = mask.additive_mask(q.dtype)
    if dense is not None:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=dense, enable_gqa=gqa)
    elif q.shape[2] == k.shape[2]:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    elif q.shape[2] == 1:
        out = F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
    else:  # a chunk of new tokens after a cache: causal, aligned to the end of the keys
        past = k.shape[2] - q.shape[2]
        keep = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril(past)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, enable_gqa=gqa)
    return out.transpose(1, 2)
