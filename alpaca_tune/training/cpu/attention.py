"""Causal self-attention for training a bf16 model on CPU: bf16 products, skipping the masked half.

PyTorch's CPU flash-attention kernels run this model's attention (head dim 64, a few hundred
tokens) at ~30-50 GFLOP/s in either dtype, while a bf16 matmul on the same 2 cores reaches ~350.
Written as batched matmuls instead, attention is fast except for one waste: the upper half of
every score matrix is masked. So the queries are cut into blocks of about BLOCK_ROWS, and each
block is multiplied only with the keys it may see (for 4 blocks, 10/16 of the full products).
Forward + backward of one SmolLM2 layer at 4 x 400 tokens: 38.5 ms with fp32 SDPA (the previous
path), 20.9 ms here; 1.1x at 128-192 tokens (scripts/bench_attention.py, BENCHMARKS.md).

Precision, checked against an fp64 reference (tests/training/cpu/test_attention.py): scores are computed
from bf16 q, k in fp32 (a bf16 score rounds by up to ~0.1 at magnitudes of 20, which eager bf16
attention accepts and this does not); the softmax is in fp32; probabilities, values and
gradients go through bf16 products with fp32 accumulation, as in PyTorch's own bf16 kernels.
The grouped key/value heads are never repeated: each key/value head serves its query heads as
rows of one product.

Registered with transformers as the attention implementation "cpu_causal_blocks"; a call it does
not cover (a mask, as when packing; a KV cache; dropout) goes to SDPA with q, k, v in fp32. A
step's shared preamble (shared_prefix.py) reaches it as the decoder's keyword argument
`shared_prefix`, which transformers passes down to every layer's attention function.
"""

from __future__ import annotations

import logging
import math

import torch

log = logging.getLogger(__name__)

NAME = "cpu_causal_blocks"

# Query rows per block: measured per layer at 128-512 tokens, 48-64 was fastest (128 up to 1.3x
# slower at 400-512); fewer rows make more, smaller products, more rows multiply more of the
# masked half.
BLOCK_ROWS = 64


def block_bounds(length: int) -> list[int]:
    """Row boundaries [0, ..., length] of ceil(length / BLOCK_ROWS) near-equal query blocks."""
    blocks = max(1, math.ceil(length / BLOCK_ROWS))
    return [round(length * i / blocks) for i in range(blocks + 1)]


class CausalBlockAttention(torch.autograd.Function):
    """softmax(q k^T * scale + causal mask) v for q [B, H, T, D], k and v [B, KV, S, D] (H a
    multiple of KV, S >= T), all of one dtype; returns [B, H, T, D]. The queries are the last T of
    the S positions (S > T when keys of a shared prefix come first, shared_prefix.py). Saves the
    probabilities (in q's dtype) for backward instead of recomputing them."""

    @staticmethod
    def forward(ctx, q, k, v, scale: float):
        batch, heads, length, dim = q.shape
        kv_heads = k.shape[1]
        group = heads // kv_heads
        offset = k.shape[2] - length  # keys before the first query's position
        # transformers hands over transposed views of [B, T, heads, D]. Query head h uses key/value
        # head h // group, so each kv head's queries are its group's rows: q as [B, KV, G, T, D]
        # (a view), whose rows each block copies out in fp32, one pass over q in all.
        grouped_q = q.reshape(batch, kv_heads, group, length, dim)
        k, v = k.contiguous(), v.contiguous()
        keys_t = k.float().transpose(-1, -2)
        # The output is written in the [B, T, heads, D] layout transformers reshapes it to next,
        # and returned as the [B, heads, T, D] view of it: no copy on the way out.
        out = torch.empty(batch, length, heads, dim, dtype=q.dtype, device=q.device)
        grouped_out = out.view(batch, length, kv_heads, group, dim).permute(0, 2, 3, 1, 4)
        bounds = block_bounds(length)
        probs = []
        for r0, r1 in zip(bounds, bounds[1:]):
            rows = grouped_q[:, :, :, r0:r1].to(torch.float32, memory_format=torch.contiguous_format)
            seen = offset + r1  # keys the block's last row may see
            scores = rows.reshape(batch, kv_heads, -1, dim) @ keys_t[..., :seen]  # [B, KV, G*rows, seen], fp32
            scores.mul_(scale)
            # Only the block's own columns hold positions later than some of its rows.
            future = torch.ones(r1 - r0, r1 - r0, dtype=torch.bool, device=q.device).triu(1)
            scores.view(batch, kv_heads, -1, r1 - r0, seen)[..., offset + r0:].masked_fill_(future, float("-inf"))
            p = torch.softmax(scores, dim=-1).to(q.dtype)
            grouped_out[:, :, :, r0:r1] = (p @ v[:, :, :seen]).view(batch, kv_heads, group, r1 - r0, dim)
            probs.append(p)
        out = out.transpose(1, 2)
        ctx.save_for_backward(q, k, v, out, *probs)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, d_out):
        q, k, v, out, *probs = ctx.saved_tensors
        # The first layer's keys (and values) need none: its input, the embeddings, is frozen.
        need_q, need_k, need_v = ctx.needs_input_grad[:3]
        batch, heads, length, dim = q.shape
        kv_heads = k.shape[1]
        group = heads // kv_heads
        offset = k.shape[2] - length
        # softmax backward needs rowsum(p * dp) per query; it equals rowsum(d_out * out), in fp32.
        delta = (d_out.float() * out).sum(-1).reshape(batch, kv_heads, group, length)
        grouped_d_out = d_out.reshape(batch, kv_heads, group, length, dim)
        grouped_q = q.reshape(batch, kv_heads, group, length, dim)
        # Gradients go out in the layout the inputs came in ([B, T, heads, D] transposed), which
        # the projections' backward reads without a copy.
        d_q = _like_input(q)
        grouped_d_q = d_q.reshape(batch, kv_heads, group, length, dim)  # a view
        d_k = torch.zeros(k.shape, dtype=torch.float32, device=k.device)  # summed over blocks
        d_v = torch.zeros(v.shape, dtype=torch.float32, device=v.device)
        bounds = block_bounds(length)
        for (r0, r1), p in zip(zip(bounds, bounds[1:]), probs):
            seen = offset + r1
            rows_d_out = grouped_d_out[:, :, :, r0:r1].reshape(batch, kv_heads, -1, dim)
            if need_v:
                d_v[:, :, :seen] += p.transpose(-1, -2) @ rows_d_out
            if not (need_q or need_k):
                continue
            d_scores = (rows_d_out @ v[:, :, :seen].transpose(-1, -2)).float()
            d_scores.sub_(delta[:, :, :, r0:r1].reshape(batch, kv_heads, -1, 1)).mul_(p).mul_(ctx.scale)
            d_scores = d_scores.to(q.dtype)
            if need_q:
                grouped_d_q[:, :, :, r0:r1] = (d_scores @ k[:, :, :seen]).view(batch, kv_heads, group, r1 - r0, dim)
            if need_k:
                rows_q = grouped_q[:, :, :, r0:r1].reshape(batch, kv_heads, -1, dim)
                d_k[:, :, :seen] += d_scores.transpose(-1, -2) @ rows_q
        return (d_q if need_q else None,
                _like_input(k).copy_(d_k) if need_k else None,
                _like_input(v).copy_(d_v) if need_v else None, None)


def _like_input(x: torch.Tensor) -> torch.Tensor:
    """An empty [B, heads, T, D] tensor laid out as [B, T, heads, D], as transformers' inputs are."""
    batch, heads, length, dim = x.shape
    return torch.empty(batch, length, heads, dim, dtype=x.dtype, device=x.device).transpose(1, 2)


def causal_block_attention(q, k, v, scale: float | None = None) -> torch.Tensor:
    """Causal attention [B, H, T, D] for q [B, H, T, D], k and v [B, KV, S, D] whose last T
    positions are the queries'."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    with torch.autocast(q.device.type, enabled=False):  # its products pick their own dtypes
        return CausalBlockAttention.apply(q, k, v, scale)


def _covers(module, query, key, attention_mask, dropout: float, kwargs) -> bool:
    """Plain causal self-attention, the queries being the last positions (all of them, or all
after a shared preamble): what causal_block_attention computes."""
    return (attention_mask is None and key.shape[2] >= query.shape[2] > 1 and dropout == 0.0
            and kwargs.get("is_causal", getattr(module, "is_causal", True)) is not False
            and kwargs.get("softcap") is None and kwargs.get("position_bias") is None
            and kwargs.get("cache") is None)


def _attention(module, query, key, value, attention_mask, dropout: float = 0.0,
               scaling: float | None = None, shared_prefix=None, **kwargs):
    if shared_prefix is not None:  # a step's preamble: its keys go before (or are kept from) these
        key, value = shared_prefix.keys_for(module.layer_idx, key, value)
    if _covers(module, query, key, attention_mask, dropout, kwargs):
        output = causal_block_attention(query, key, value, scaling)
        return output.transpose(1, 2).contiguous(), None  # transformers wants [B, T, H, D]
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    # Autocast would cast q, k, v straight back to bf16 for SDPA, so it is paused here; PyTorch's
    # CPU kernels are faster in fp32 than in bf16 for these shapes.
    with torch.autocast(query.device.type, enabled=False):
        output, weights = sdpa_attention_forward(module, query.float(), key.float(), value.float(),
                                                 attention_mask, dropout=dropout, scaling=scaling,
                                                 **kwargs)
    return output.to(query.dtype), weights


def use_cpu_attention(causal_lm) -> int:
    """Switch a loaded transformers model (bf16, on CPU, for training) to this attention; returns
    how many attention modules now dispatch to it. None (an upgrade changed how transformers
    picks attention functions): a WARNING, and the model stays on SDPA."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    AttentionInterface.register(NAME, _attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    causal_lm.set_attn_implementation(NAME)
    switched = sum(1 for module in causal_lm.modules() if hasattr(module, "layer_idx")
                   and getattr(getattr(module, "config", None), "_attn_implementation", None) == NAME
                   and hasattr(module, "q_proj"))
    if not switched:
        log.warning("cpu attention: no attention module of %s reads its attention function from the "
                    "config any more; training with SDPA", type(causal_lm).__name__)
        causal_lm.set_attn_implementation("sdpa")
    return switched
