"""One new token's attention over its sequence's KV cache, as one compiled call per layer.

Why a numba kernel rather than numpy: a batched decode step attends row by row (each request has
its own cache and length), and the numpy version (scores, max, exp, sum, divide, weighted sum:
about ten calls of a few microseconds each on arrays this small) cost 72 us per row and layer
on a 2-core AMD EPYC (AVX2): 17 ms of a 90 ms step for 8 rows of SmolLM2 (30 layers). This
kernel stores the token's key and value and attends in one call, without the GIL; attend_tokens
does it for every row of a batch step in one parallel call a layer (each row's cache found by
its address, since each has its own size). The same arithmetic (_attend_group) serves a token
decoded alone (LeanLlama.forward) and in a batch (forward_batch), so a request's numbers do not
depend on its company; every sum runs in one fixed order (positions in
order for the weighted values, head dimensions in order for each score), as plain fp32 without
fast-math.
"""

from __future__ import annotations

import math

import numpy as np
from numba import carray, njit, prange, types
from numba.extending import intrinsic


@njit(nogil=True, cache=True, inline="always")
def _attend_group(q, k, v, keys_t, values, position, out, g):
    """attend_token for the query heads that read kv head g (and that head's key and value)."""
    heads, dim = q.shape
    group = heads // k.shape[0]
    length = position + 1
    for d in range(dim):
        keys_t[g, d, position] = k[g, d]
        values[g, position, d] = v[g, d]
    scale = np.float32(1.0 / math.sqrt(dim))
    scores = np.empty(length, np.float32)
    for h in range(g * group, (g + 1) * group):
        scores[:] = 0
        for d in range(dim):
            qd = q[h, d]
            for p in range(length):
                scores[p] += qd * keys_t[g, d, p]
        top = np.float32(-np.inf)
        for p in range(length):
            scores[p] *= scale
            top = max(top, scores[p])
        total = np.float32(0)
        for p in range(length):
            scores[p] = np.exp(scores[p] - top)
            total += scores[p]
        row = out[h * dim:(h + 1) * dim]
        row[:] = 0
        for p in range(length):
            weight = scores[p] / total
            for d in range(dim):
                row[d] += weight * values[g, p, d]


@njit(nogil=True, cache=True)
def attend_token(q, k, v, keys_t, values, position, out):
    """q [heads, D], k and v [kv_heads, D]: the new token's; keys_t [kv_heads, D, capacity] and
    values [kv_heads, capacity, D]: one layer's cache, filled up to `position`. Stores k and v at
    `position`, then writes the token's attention over positions 0..position into out [heads * D].
    Query head h reads kv head h // (heads // kv_heads), as transformers' repeat_kv."""
    for g in range(k.shape[0]):
        _attend_group(q, k, v, keys_t, values, position, out, g)


@intrinsic
def _float32_pointer(typingctx, address):
    """An int64 address as a float32 pointer (for carray)."""
    signature = types.CPointer(types.float32)(types.int64)

    def codegen(context, builder, sig, args):
        return builder.inttoptr(args[0], context.get_value_type(types.CPointer(types.float32)))

    return signature, codegen


@njit(parallel=True, nogil=True, cache=True)
def attend_tokens(q, k, v, keys_at, values_at, capacities, positions, layer, out):
    """attend_token for one new token of each of B sequences, in parallel over (sequence, kv
    head): q [B, heads, D], k and v [B, kv_heads, D], out [B, heads * D]; sequence b's cache is
    a KVCache's keys_t and values, at addresses keys_at[b] and values_at[b] (int64), holding
    capacities[b] positions a layer, filled up to positions[b]; `layer` picks the layer."""
    batch, kv_heads, dim = k.shape
    for task in prange(batch * kv_heads):
        b, g = task // kv_heads, task % kv_heads
        size = kv_heads * dim * capacities[b]  # floats a layer
        offset = layer * size * 4  # bytes
        keys_t = carray(_float32_pointer(keys_at[b] + offset), (kv_heads, dim, capacities[b]))
        values = carray(_float32_pointer(values_at[b] + offset), (kv_heads, capacities[b], dim))
        _attend_group(q[b], k[b], v[b], keys_t, values, positions[b], out[b], g)
