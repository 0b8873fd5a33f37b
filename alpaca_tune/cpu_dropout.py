"""A cheaper dropout for the LoRA inputs on CPU: 16 random bits per element, 4 per draw.

PEFT puts an nn.Dropout in front of every LoRA pair; on CPU its mask costs one draw of the
generator per element (`bernoulli_`), ~5 ms for one micro-batch's input to one adapted layer, which
was ~8% of a CPU training step with LoRA on q_proj and v_proj (BENCHMARKS.md). Here each 64-bit
draw gives the random bits of four elements: a 16-bit value per element is compared with a
threshold, so an element is dropped with probability round(p * 65536) / 65536 (0.05 becomes
0.0500030...) and the survivors are scaled by exactly 1 / (1 - that), as in nn.Dropout. The draws
come from torch's seeded generator, so runs stay reproducible and resumable. GPUs keep
nn.Dropout: their fused kernel is already cheap.
"""

from __future__ import annotations

import torch

_LEVELS = 1 << 16  # 16-bit random values per element


class CpuDropout(torch.nn.Module):
    def __init__(self, p: float):
        super().__init__()
        self.dropped = round(p * _LEVELS)  # values below this threshold are dropped
        self.p = self.dropped / _LEVELS
        self.scale = 1.0 / (1.0 - self.p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.dropped == 0:
            return x
        n = x.numel()
        draws = torch.randint(-2**63, 2**63 - 1, ((n + 3) // 4,), dtype=torch.int64, device=x.device)
        # int16 values are uniform on [-32768, 32767]; keep those at or above the threshold
        keep = draws.view(torch.int16)[:n].view(x.shape) >= self.dropped - _LEVELS // 2
        return x * (keep.to(x.dtype) * self.scale)

    def extra_repr(self) -> str:
        return f"p={self.p}"


def use_cpu_dropout(peft_model) -> int:
    """Swap PEFT's LoRA dropouts (nn.Dropout, p > 0) for CpuDropout; returns how many were swapped."""
    swapped = 0
    for module in peft_model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if not isinstance(dropouts, torch.nn.ModuleDict):
            continue
        for name, dropout in dropouts.items():
            if type(dropout) is torch.nn.Dropout and dropout.p > 0:
                dropouts[name] = CpuDropout(dropout.p)
                swapped += 1
    return swapped
