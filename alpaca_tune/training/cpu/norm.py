"""RMSNorm for training a bf16 model on CPU: transformers' result in fewer passes over memory.

transformers' LlamaRMSNorm upcasts its input to fp32, squares it, averages, scales, rounds back
to bf16 and multiplies by the weight: six element-wise kernels forward and about ten in autograd's
backward, each a pass over a [tokens x hidden] tensor. A decoder has two norms a layer (61 for
SmolLM2), so on CPU they were ~5-9% of a training step. Here the forward is four passes (fp32
copy, sum of squares, scale and round, weight) and the backward six, in place where it can be,
with the same roundings as transformers' (outputs equal; gradients within fp32 rounding of its
own: tests/training/cpu/test_norm.py). Forward + backward of one norm at 4 x 210 tokens, side by side:
1.47 ms (transformers) -> 0.93 ms on the project's machine.

Only for a frozen weight (LoRA never trains the norms); a norm whose weight needs a gradient, or
an input that is not bf16, runs transformers' own forward. When swapped in, its output is
compared with transformers' forward on a random input: a transformers upgrade that changes what
LlamaRMSNorm computes turns the swap off (with a WARNING) instead of training something else.
"""

from __future__ import annotations

import logging
import types

import torch

log = logging.getLogger(__name__)


class RMSNormFunction(torch.autograd.Function):
    """weight * bf16(x * rsqrt(mean(x^2) + eps)), the mean and product in fp32; no weight gradient.

    Each step converts x to fp32 once, explicitly: PyTorch's CPU kernels given bf16 and fp32
    operands together make a hidden fp32 copy per call instead of converting on the fly."""

    @staticmethod
    def forward(ctx, x, weight, eps: float):
        x32 = x.float()
        variance = torch.linalg.vector_norm(x32, dim=-1, keepdim=True).square_().div_(x.shape[-1])
        inv_rms = variance.add_(eps).rsqrt_()
        ctx.save_for_backward(x, inv_rms, weight)  # x in bf16: half the memory of x32
        return x32.mul_(inv_rms).to(x.dtype).mul_(weight)

    @staticmethod
    def backward(ctx, d_out):
        x, inv_rms, weight = ctx.saved_tensors
        x32 = x.float()
        # d/dx of x * r(x), r = (mean(x^2) + eps)^-1/2:  g * r - x * r^3 * mean(g * x),
        # g being the gradient at the rounded product (d_out * weight, in bf16 as autograd has it)
        g = (d_out * weight).float()
        coefficient = inv_rms.pow(3).mul_(torch.linalg.vecdot(g, x32).unsqueeze(-1)).div_(-x.shape[-1])
        return g.mul_(inv_rms).addcmul_(x32, coefficient).to(x.dtype), None, None


def _forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    if self.weight.requires_grad or hidden_states.dtype != torch.bfloat16:
        return type(self).forward(self, hidden_states)
    with torch.autocast(hidden_states.device.type, enabled=False):  # it picks its own dtypes
        return RMSNormFunction.apply(hidden_states, self.weight, self.variance_epsilon)


def use_cpu_rms_norm(causal_lm) -> int:
    """Give every LlamaRMSNorm of a loaded model this forward; returns how many (0, with a WARNING,
    when a Llama has none or transformers' forward computes something else now)."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    norms = [module for module in causal_lm.modules() if type(module) is LlamaRMSNorm]  # subclasses may differ
    if not norms:
        if getattr(causal_lm.config, "model_type", None) == "llama":
            log.warning("cpu RMSNorm: this Llama has no LlamaRMSNorm modules; norms run transformers' forward")
        return 0
    if not _computes_the_same(norms[0]):
        log.warning("cpu RMSNorm: LlamaRMSNorm's forward no longer computes what cpu/norm.py does; "
                    "norms run transformers' forward")
        return 0
    for module in norms:
        module.forward = types.MethodType(_forward, module)
    return len(norms)


@torch.no_grad()
def _computes_the_same(norm) -> bool:
    """This forward and transformers' give the same bf16 output for a random input."""
    x = torch.randn(3, norm.weight.shape[-1], generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    with torch.autocast(x.device.type, enabled=False):
        theirs = type(norm).forward(norm, x)
        ours = RMSNormFunction.apply(x, norm.weight, norm.variance_epsilon)
    return theirs.dtype == ours.dtype and torch.equal(theirs, ours)
