"""A faster weight layout for single-stream decoding on CPU.

Decoding one token is a matrix-vector product per Linear, bound by how fast the weights stream
from memory. For nn.Linear's [out, in] weight, PyTorch's CPU kernels stream only ~10 GB/s on the
project's machine; the same product over the weight stored [in, out] (x @ W_t) is ~1.3x faster per
token end to end (BENCHMARKS.md, decoding). Inference only: the swapped modules hold frozen
weights and are never trained or saved.
"""

from __future__ import annotations

import torch
from torch import nn


class InputMajorLinear(nn.Module):
    """y = x @ weight_t (+ bias), with weight_t = Linear.weight transposed, contiguous: [in, out]."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.weight_t = nn.Parameter(linear.weight.detach().t().contiguous(), requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x @ self.weight_t  # [..., in] @ [in, out]
        return y if self.bias is None else y + self.bias


def use_input_major_linears(model: nn.Module) -> int:
    """Swap every plain nn.Linear inside the decoder layers; returns how many were swapped.

    The LM head is left alone: it shares its weight with the embeddings in tied models, and
    measured no faster transposed.
    """
    swapped = 0
    for layer in model.get_decoder().layers:
        for parent in list(layer.modules()):
            for name, child in list(parent.named_children()):
                if type(child) is nn.Linear:  # not LoRA or quantized subclasses
                    setattr(parent, name, InputMajorLinear(child))
                    swapped += 1
    return swapped
