"""attention.py: one new token's attention, checked against a float64 softmax attention with
grouped-query heads, and its key and value stored where the cache expects them."""

import numpy as np
import pytest

from alpaca_tune.serving.lean.attention import attend_token
from alpaca_tune.serving.lean.llama import KVCache


@pytest.mark.parametrize("heads,kv_heads,position", [(4, 4, 0), (6, 2, 5), (9, 3, 130)])
def test_attention_equals_a_float64_reference(heads, kv_heads, position):
    rng = np.random.default_rng(position)
    dim, capacity = 16, 200
    keys_t = rng.standard_normal((kv_heads, dim, capacity)).astype(np.float32)
    values = rng.standard_normal((kv_heads, capacity, dim)).astype(np.float32)
    q, k, v = (rng.standard_normal((n, dim)).astype(np.float32) for n in (heads, kv_heads, kv_heads))
    out = np.full(heads * dim, np.nan, np.float32)
    attend_token(q, k, v, keys_t, values, position, out)
    assert np.array_equal(keys_t[:, :, position], k) and np.array_equal(values[:, position], v)
    expected = []
    for h in range(heads):
        g = h // (heads // kv_heads)
        scores = q[h].astype(np.float64) @ keys_t[g, :, :position + 1].astype(np.float64) / np.sqrt(dim)
        weights = np.exp(scores - scores.max())
        expected.append(weights / weights.sum() @ values[g, :position + 1].astype(np.float64))
    assert np.allclose(out, np.concatenate(expected), rtol=1e-5, atol=1e-5)


def test_a_full_cache_is_refused():
    cache = KVCache(layers=1, kv_heads=1, head_dim=4, capacity=2)
    token = np.ones((1, 4), np.float32)
    out = np.empty(4, np.float32)
    cache.attend_token(0, token, token, token, out)
    cache.length = 2
    with pytest.raises(ValueError, match="KV cache full"):
        cache.attend_token(0, token, token, token, out)


def test_a_batch_of_caches_of_their_own_sizes_equals_each_row_alone():
    """attend_tokens finds each row's cache by address: rows with caches of different capacities,
    lengths and layers get exactly what attend_token gives each alone, their keys and values
    stored in their own cache's layer, the other layers untouched."""
    from alpaca_tune.serving.lean.llama import TokenAttention

    rng = np.random.default_rng(7)
    heads, kv_heads, dim, layers = 6, 2, 16, 3
    caches, alone = [], []
    for capacity, length in ((40, 0), (130, 77), (9, 8), (64, 31)):
        cache = KVCache(layers, kv_heads, dim, capacity)
        cache.keys_t[:] = rng.standard_normal(cache.keys_t.shape)
        cache.values[:] = rng.standard_normal(cache.values.shape)
        cache.length = length
        twin = KVCache(layers, kv_heads, dim, capacity)
        twin.keys_t[:], twin.values[:], twin.length = cache.keys_t, cache.values, length
        caches.append(cache)
        alone.append(twin)
    q = rng.standard_normal((len(caches), heads, dim)).astype(np.float32)
    k, v = (rng.standard_normal((len(caches), kv_heads, dim)).astype(np.float32) for _ in range(2))
    out = np.full((len(caches), heads * dim), np.nan, np.float32)
    TokenAttention(caches)(1, q, k, v, out)
    for row, (cache, twin) in enumerate(zip(caches, alone)):
        expected = np.empty(heads * dim, np.float32)
        attend_token(q[row], k[row], v[row], twin.keys_t[1], twin.values[1], twin.length, expected)
        assert np.array_equal(out[row], expected)
        assert np.array_equal(cache.keys_t, twin.keys_t) and np.array_equal(cache.values, twin.values)
