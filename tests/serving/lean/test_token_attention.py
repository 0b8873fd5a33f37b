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
