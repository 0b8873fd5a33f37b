"""cpu_norm: RMSNorm for bf16 training on CPU, checked against transformers' LlamaRMSNorm and float64.

Forward: the same roundings as transformers' (fp32 statistics, the product rounded to bf16, then
the weight), so outputs agree to the last bit but for the rare tie decided by the sum's order.
Backward: the float64 derivative of that same function is the reference; our error must stay
at the level of transformers' own autograd in fp32.
"""

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from alpaca_tune.training.cpu.norm import RMSNormFunction, use_cpu_rms_norm


def _norm(width, seed=0):
    norm = LlamaRMSNorm(width, eps=1e-5).to(torch.bfloat16).requires_grad_(False)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(width, generator=torch.Generator().manual_seed(seed)) * 2 - 0.5)
    return norm


def _inputs(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    # rows of very different scales, as the residual stream has
    scale = torch.exp(torch.randn(*shape[:-1], 1, generator=g) * 2)
    return (torch.randn(*shape, generator=g) * scale).to(torch.bfloat16), \
        torch.randn(*shape, generator=g).to(torch.bfloat16)


def _float64_grad(x, weight, eps, d_out):
    """d/dx of sum(d_out * weight * (x * rsqrt(mean(x^2) + eps))) in float64 (rounding ignored)."""
    x = x.double().requires_grad_()
    normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    (normed * weight.double() * d_out.double()).sum().backward()
    return x.grad


@pytest.mark.parametrize("shape", [(2, 9, 64), (1, 3, 576), (4, 1, 40)])
def test_matches_transformers_forward_and_float64_gradient(shape):
    norm = _norm(shape[-1])
    x, d_out = _inputs(shape)
    results = {}
    for name, fn in (("ours", lambda t: RMSNormFunction.apply(t, norm.weight, norm.variance_epsilon)),
                     ("transformers", norm)):
        leaf = x.clone().requires_grad_()
        out = fn(leaf)
        out.backward(d_out)
        results[name] = out.detach(), leaf.grad
    (out, grad), (ref_out, ref_grad) = results["ours"], results["transformers"]
    assert out.dtype == grad.dtype == torch.bfloat16
    assert (out != ref_out).float().mean() < 0.01  # the same roundings: equal but for rare ties
    torch.testing.assert_close(out.float(), ref_out.float(), atol=0, rtol=2 ** -7)
    exact = _float64_grad(x, norm.weight, norm.variance_epsilon, d_out)
    ours_error = ((grad.double() - exact).norm() / exact.norm()).item()
    theirs_error = ((ref_grad.double() - exact).norm() / exact.norm()).item()
    assert ours_error < 2 * theirs_error + 1e-6, (ours_error, theirs_error)


def test_model_uses_it_and_trains_the_same(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    ids = torch.randint(3, 300, (2, 21), generator=torch.Generator().manual_seed(1))
    results = {}
    for swap in (False, True):
        model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.bfloat16)
        for name, parameter in model.named_parameters():
            parameter.requires_grad_("q_proj" in name)  # as LoRA: only projections train
        if swap:
            layers = model.config.num_hidden_layers
            assert use_cpu_rms_norm(model) == 2 * layers + 1  # two per layer and the final norm
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        results[swap] = out.logits.float(), model.model.layers[0].self_attn.q_proj.weight.grad.float()
    (ref_logits, ref_grad), (logits, grad) = results[False], results[True]
    torch.testing.assert_close(logits, ref_logits, atol=0.05, rtol=0.02)
    assert ((grad - ref_grad).norm() / ref_grad.norm()) < 0.02


def test_a_norm_whose_weight_trains_keeps_transformers_forward():
    norm = _norm(32)
    norm.weight.requires_grad_(True)
    use_cpu_rms_norm(norm)
    x, d_out = _inputs((2, 5, 32))
    norm(x).backward(d_out)
    assert norm.weight.grad is not None and norm.weight.grad.abs().sum() > 0
