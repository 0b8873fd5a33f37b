"""cpu_causal_blocks: causal attention as blockwise bf16 products, for training bf16 models on CPU.

The reference is PyTorch's SDPA in float64 on the same bf16 inputs (an independent
implementation, at a precision neither path has); the bound for our errors is what bf16 itself
costs: PyTorch's fp32 SDPA on those inputs, whose only rounding is the bf16 output.
"""

import pytest
import torch
import torch.nn.functional as F

from alpaca_tune.data.batching import collate_packed
from alpaca_tune.data.tokenization import IGNORE_INDEX, Example
from alpaca_tune.training.cpu import attention as cpu_attention
from alpaca_tune.training.cpu.attention import (
    block_bounds,
    causal_block_attention,
    use_cpu_attention,
)
from alpaca_tune.training.loss import decoder_inputs


def _inputs(length, heads=4, kv_heads=2, dim=16, spread=1.0, seed=0, prefix=0):
    """q, k, v as transformers hands them over: transposed views of [B, T, heads, D], bf16; k and
    v with `prefix` more positions before the queries' (a shared prefix's keys)."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = ((torch.randn(2, length + extra, n, dim, generator=g) * s).to(torch.bfloat16).transpose(1, 2)
               for n, s, extra in ((heads, spread, 0), (kv_heads, spread, prefix), (kv_heads, 1.0, prefix)))
    return q, k, v


def _reference(q, k, v, d_out):
    """(output, dq, dk, dv) from SDPA in float64, key/value heads repeated for their query heads."""
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    group = q.shape[1] // k.shape[1]
    length, keys = q.shape[2], k.shape[2]
    # the queries are the last `length` positions: query i sees keys up to keys - length + i
    visible = torch.ones(length, keys, dtype=torch.bool).tril(keys - length)
    out = F.scaled_dot_product_attention(leaves[0], leaves[1].repeat_interleave(group, 1),
                                         leaves[2].repeat_interleave(group, 1), attn_mask=visible)
    out.backward(d_out.double())
    return [out.detach()] + [t.grad for t in leaves]


def _run(attention, q, k, v, d_out):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = attention(*leaves)
    out.backward(d_out)
    return [out.detach()] + [t.grad for t in leaves]


def _fp32_sdpa(q, k, v):
    group = q.shape[1] // k.shape[1]
    visible = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool).tril(k.shape[2] - q.shape[2])
    return F.scaled_dot_product_attention(q.float(), k.float().repeat_interleave(group, 1),
                                          v.float().repeat_interleave(group, 1), attn_mask=visible).to(q.dtype)


def _relative_errors(got, expected):
    return [((a.double() - b).norm() / b.norm()).item() for a, b in zip(got, expected)]


def test_block_bounds_cover_the_sequence_in_near_equal_blocks(monkeypatch):
    monkeypatch.setattr(cpu_attention, "BLOCK_ROWS", 64)
    assert block_bounds(1) == [0, 1]
    assert block_bounds(64) == [0, 64]
    assert block_bounds(65) == [0, 32, 65]  # two blocks of 32-33 rows, not 64 + 1
    bounds = block_bounds(400)
    assert bounds[0] == 0 and bounds[-1] == 400 and len(bounds) == 8
    assert max(b - a for a, b in zip(bounds, bounds[1:])) - min(b - a for a, b in zip(bounds, bounds[1:])) <= 1


@pytest.mark.parametrize("block_rows", [7, 64])  # many uneven blocks; one block at these lengths
@pytest.mark.parametrize("length,heads,kv_heads,prefix", [(2, 4, 2, 0), (45, 4, 2, 0), (60, 6, 2, 0), (33, 4, 4, 0),
                                                          (1, 4, 2, 5), (45, 4, 2, 24), (60, 6, 2, 9)])
def test_output_and_gradients_match_float64_reference(monkeypatch, block_rows, length, heads, kv_heads, prefix):
    """Also with keys of a shared prefix before the queries' own (shared_prefix.py)."""
    monkeypatch.setattr(cpu_attention, "BLOCK_ROWS", block_rows)
    q, k, v = _inputs(length, heads, kv_heads, prefix=prefix)
    d_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(9)).to(torch.bfloat16)
    expected = _reference(q, k, v, d_out)
    got = _run(causal_block_attention, q, k, v, d_out)
    bf16_floor = _relative_errors(_run(_fp32_sdpa, q, k, v, d_out), expected)
    for name, error, floor in zip(("output", "dq", "dk", "dv"), _relative_errors(got, expected), bf16_floor):
        assert error < 1.5e-2, f"{name}: relative error {error:.2e}"
        assert error < 5 * floor + 1e-3, f"{name}: {error:.2e} against bf16's own {floor:.2e}"
    assert all(t.dtype == torch.bfloat16 for t in got)


def test_scores_are_not_rounded_to_bf16(monkeypatch):
    """Large scores (|q.k| ~ 20, as trained models have) lose ~0.1 each when rounded to bf16;
    computed in fp32, the output stays as close to exact as bf16 outputs can be."""
    monkeypatch.setattr(cpu_attention, "BLOCK_ROWS", 16)
    q, k, v = _inputs(48, spread=3.0, seed=3)
    exact = _reference(q, k, v, torch.zeros(q.shape, dtype=torch.bfloat16))[0]
    ours = causal_block_attention(q, k, v).double()
    group = q.shape[1] // k.shape[1]
    scores_in_bf16 = ((q @ k.repeat_interleave(group, 1).transpose(-1, -2)) * q.shape[-1] ** -0.5).float()
    scores_in_bf16 = scores_in_bf16.masked_fill(torch.ones(48, 48, dtype=torch.bool).triu(1), float("-inf"))
    rounded = (scores_in_bf16.softmax(-1).to(torch.bfloat16) @ v.repeat_interleave(group, 1)).double()
    floor = ((_fp32_sdpa(q, k, v).double() - exact).norm() / exact.norm()).item()
    ours_error = ((ours - exact).norm() / exact.norm()).item()
    rounded_error = ((rounded - exact).norm() / exact.norm()).item()
    assert ours_error < 1.5 * floor
    assert rounded_error > 2 * ours_error  # the test can tell the two apart


def test_autocast_does_not_change_it():
    q, k, v = _inputs(40)
    plain = causal_block_attention(q, k, v)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = causal_block_attention(q, k, v)
    assert torch.equal(plain, under_autocast)


def _bf16_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.bfloat16)


def test_model_logits_and_gradients_match_fp32_sdpa(tiny_model_dir, monkeypatch):
    monkeypatch.setattr(cpu_attention, "BLOCK_ROWS", 8)
    ids = torch.randint(3, 300, (2, 37), generator=torch.Generator().manual_seed(4))
    results = {}
    for implementation in ("sdpa", cpu_attention.NAME):
        model = _bf16_model(tiny_model_dir)
        if implementation == cpu_attention.NAME:
            use_cpu_attention(model)
        else:  # the reference: the same weights in fp32 with transformers' SDPA
            model = model.float()
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        results[implementation] = out.logits.float(), model.model.layers[0].self_attn.q_proj.weight.grad.float()
    assert model.config._attn_implementation == cpu_attention.NAME
    (ref_logits, ref_grad), (logits, grad) = results["sdpa"], results[cpu_attention.NAME]
    torch.testing.assert_close(logits, ref_logits, atol=0.1, rtol=0.05)
    assert ((grad - ref_grad).norm() / ref_grad.norm()) < 0.05


def test_packed_examples_stay_apart_through_the_masked_fallback(tiny_model_dir):
    model = _bf16_model(tiny_model_dir)
    use_cpu_attention(model)
    g = torch.Generator().manual_seed(1)
    examples = [Example(ids, [IGNORE_INDEX] + ids[1:]) for ids in
                (torch.randint(3, 300, (n,), generator=g).tolist() for n in (9, 15))]
    with torch.no_grad():
        packed = model(**decoder_inputs(model, collate_packed(examples))).logits[0]
        alone = model(input_ids=torch.tensor([examples[1].input_ids])).logits[0]
    torch.testing.assert_close(packed[9:], alone, atol=2e-2, rtol=2e-2)


def test_generation_with_a_kv_cache_falls_back_and_matches(tiny_model_dir):
    """One new token against a cache (q and k of different lengths) is not what the blocks cover."""
    model = _bf16_model(tiny_model_dir)
    prompt = torch.tensor([[1, 5, 9, 13, 17, 21]])
    expected = model.generate(prompt, max_new_tokens=6, do_sample=False)
    use_cpu_attention(model)
    assert torch.equal(model.generate(prompt, max_new_tokens=6, do_sample=False), expected)


def test_only_the_gradients_asked_for_are_computed():
    """A frozen input (the first layer's keys, whose input is the frozen embedding) gets none;
    the others are unchanged."""
    q, k, v = _inputs(50)
    d_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    _, full_dq, _, full_dv = _run(causal_block_attention, q, k, v, d_out)
    q2, v2 = q.detach().clone().requires_grad_(), v.detach().clone().requires_grad_()
    frozen_k = k.detach().clone()
    causal_block_attention(q2, frozen_k, v2).backward(d_out)
    assert frozen_k.grad is None
    assert torch.equal(q2.grad, full_dq) and torch.equal(v2.grad, full_dv)
