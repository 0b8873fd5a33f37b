"""RMSNorm for training a bf16 model on CPU: transformers' result in fewer passes over memory.

transformers' LlamaRMSNorm upcasts its input to fp32, squares it, averages, scales, rounds back
to bf16 and multiplies by the weight: six element-wise kernels forward and about ten in autograd's
backward, each a pass over a [tokens x hidden] tensor. A decoder has two norms a layer (61 for
SmolLM2), so on CPU they were ~5-9% of a training step. Here the forward is three passes (the
fp32 sum of squares read straight from bf16, the product x * rsqrt rounded once to bf16 as it is
written, the weight) and the backward six, with the same roundings as transformers' (outputs
equal; gradients within fp32 rounding of its own: tests/test_cpu_norm.py). Forward + backward of
one norm at 4 x 210 tokens: 1.70 -> 1.28 ms on the project's machine.

Only for a frozen weight (LoRA never trains the norms); a norm whose weight needs a gradient, or
an input that is not bf16, runs transformers' own forward.
"""

from __future__ import annotations

import types

import torch


class RMSNormFunction(torch.autograd.Function):
    """weight * bf16(x * rsqrt(mean(x^2) + eps)), the mean and product in fp32; no weight gradient."""

    @staticmethod
    def forward(ctx, x, weight, eps: float):
        width = x.shape[-1]
        # ||x||^2 / width: the fp32 sum of squares without an fp32 copy of x
        variance = torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=torch.float32).square_().div_(width)
        inv_rms = variance.add_(eps).rsqrt_()
        normed = torch.empty_like(x)
        torch.mul(x, inv_rms, out=normed)  # computed in fp32, rounded once on the way out
        ctx.save_for_backward(x, inv_rms, weight)
        return normed.mul_(weight)

    @staticmethod
    def backward(ctx, d_out):
        x, inv_rms, weight = ctx.saved_tensors
        width = x.shape[-1]
        # d/dx of x * r(x), r = (mean(x^2) + eps)^-1/2:  g * r - x * r^3 * mean(g * x),
        # g being the gradient at the rounded product (d_out * weight, in bf16 as autograd has it)
        g = (d_out * weight).float()
        coefficient = inv_rms.pow(3).mul_((g * x).sum(-1, keepdim=True)).div_(-width)
        d_x = torch.empty_like(x)
        torch.addcmul(g.mul_(inv_rms), x, coefficient, out=d_x)
        return d_x, None, None


def _forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    if self.weight.requires_grad or hidden_states.dtype != torch.bfloat16:
        return type(self).forward(self, hidden_states)
    with torch.autocast(hidden_states.device.type, enabled=False):  # it picks its own dtypes
        return RMSNormFunction.apply(hidden_states, self.weight, self.variance_epsilon)


def use_cpu_rms_norm(causal_lm) -> int:
    """Give every LlamaRMSNorm of a loaded model this forward; returns how many."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    swapped = 0
    for module in causal_lm.modules():
        if type(module) is LlamaRMSNorm:  # subclasses may compute something else
            module.forward = types.MethodType(_forward, module)
            swapped += 1
    return swapped
