"""The frozen base's dtype for training: bf16 where it is faster, fp32 elsewhere.

LoRA weights, optimizer and loss stay fp32 either way. fp16 is not offered for training: without
loss scaling its gradients underflow.

On a GPU with bf16 (Ampere and later), bf16 is the dtype. On a CPU the answer depends on the
model of CPU, not on its name: with AVX512-BF16 or AMX a bf16 product runs several times faster
than fp32, but a CPU with AVX512 alone still reports bf16 as supported (oneDNN emulates it), and
emulated bf16 is slower than fp32. So `precision=auto` on a CPU times one product of a training
step's shape in both dtypes, once per process (~0.1 s), and takes the faster.
"""

from __future__ import annotations

import functools
import logging
import time

import torch

from ..errors import UserError

log = logging.getLogger(__name__)

# The product timed: a micro-batch of rows through a square layer the size of a small model's.
PROBE_ROWS, PROBE_WIDTH, PROBE_REPEATS = 512, 1024, 5
MARGIN = 1.1  # bf16 must win by this much: its rounding is a cost, so a tie goes to fp32


class PrecisionError(UserError):
    """The precision asked for cannot run on this device."""


def bf16_supported(device: torch.device) -> bool:
    """Whether bf16 products run at all (natively or, on CPUs, possibly emulated)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def product_seconds(dtype: torch.dtype, rows: int = PROBE_ROWS, width: int = PROBE_WIDTH,
                    repeats: int = PROBE_REPEATS) -> float:
    """The fastest of `repeats` timings of one [rows, width] x [width, width] product, forward and
    the two backward products, in `dtype` on the CPU."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(rows, width, generator=generator).to(dtype)
    weight = torch.randn(width, width, generator=generator).to(dtype)
    best = float("inf")
    for _ in range(repeats + 1):  # the first call warms the kernels up
        start = time.perf_counter()
        y = x @ weight.t()
        y @ weight  # the input's gradient
        y.t() @ x  # the weight's gradient's shape (LoRA's products are thin; the base's dominate)
        best = min(best, time.perf_counter() - start)
    return best


def pick_faster(bf16_seconds: float, fp32_seconds: float) -> torch.dtype:
    return torch.bfloat16 if bf16_seconds * MARGIN < fp32_seconds else torch.float32


@functools.cache
def cpu_auto_dtype() -> tuple[torch.dtype, dict]:
    """(the faster dtype on this CPU, the timings that chose it)."""
    if not bf16_supported(torch.device("cpu")):
        return torch.float32, {"bf16_supported": False}
    bf16, fp32 = product_seconds(torch.bfloat16), product_seconds(torch.float32)
    choice = pick_faster(bf16, fp32)
    log.info("precision=auto: a bf16 product took %.2f ms, fp32 %.2f ms on this CPU: training in %s",
             bf16 * 1e3, fp32 * 1e3, "bf16" if choice == torch.bfloat16 else "fp32")
    return choice, {"bf16_ms": round(bf16 * 1e3, 3), "fp32_ms": round(fp32 * 1e3, 3)}


def training_dtype(precision: str, device: torch.device) -> torch.dtype:
    """torch.bfloat16 or torch.float32 for `precision` (auto, bf16, fp32) on `device`."""
    if precision == "fp32":
        return torch.float32
    if precision == "bf16":
        if not bf16_supported(device):
            raise PrecisionError(f"precision=bf16: this {device.type.upper()} has no bf16 support; "
                                 f"use precision=fp32 (or auto)")
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if bf16_supported(device) else torch.float32
    return cpu_auto_dtype()[0]
