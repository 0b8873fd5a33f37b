"""The training speed-ups that depend on the device and dtype, switched on in one place.

training.py calls switch_on_fast_paths once, after LoRA is attached; what each one buys is
measured in BENCHMARKS.md (CPU: allocator.py, cpu_dropout.py, cpu_attention.py, cpu_norm.py; bf16: LoRA
products under autocast; GPU: compiled decoder layers).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import logging
import os
import shutil

import torch

from .allocator import keep_freed_memory
from .cpu_attention import use_cpu_attention
from .cpu_dropout import use_cpu_dropout
from .cpu_norm import use_cpu_rms_norm

log = logging.getLogger("alpaca_tune.train")


@contextlib.contextmanager
def lora_in_base_dtype(model, base_dtype: torch.dtype | None, device: torch.device):
    """Run the LoRA products in bf16 when the base is bf16, keeping the fp32 LoRA weights.

    PEFT keeps LoRA weights in fp32 (right for AdamW's updates) and so casts each adapted layer's
    input to fp32 and the product back: per micro-batch, dozens of copies of every adapted
    layer's input and a dropout mask over fp32. Under autocast the input stays bf16 and only
    the small LoRA matrices are cast, as in mixed-precision training on GPUs; gradients still
    reach the fp32 weights. The base's own outputs are bf16 either way.
    """
    if base_dtype != torch.bfloat16:
        yield
        return
    from peft.helpers import disable_input_dtype_casting

    with torch.autocast(device.type, dtype=torch.bfloat16), disable_input_dtype_casting(model):
        yield


def switch_on_fast_paths(model, device: torch.device, base_dtype: torch.dtype, quantized: bool,
                         compile_layers: bool = False):
    """Every speed-up this device and dtype allow, in one place; returns the context each forward
    runs in (LoRA products in bf16 for an unquantized bf16 base, else nothing)."""
    if compile_layers and device.type == "cuda" and not quantized:
        missing = compiler_missing()
        if missing:
            log.warning("torch_compile: %s; training with uncompiled layers (slower)", missing)
        else:
            compile_decoder_layers(model.get_base_model())
    if device.type == "cpu":
        keep_freed_memory()  # each step re-allocates the same large tensors (allocator.py)
        use_cpu_dropout(model)  # same dropout, cheaper masks (cpu_dropout.py)
        if base_dtype == torch.bfloat16:
            use_cpu_attention(model.get_base_model())  # attention as bf16 products (cpu_attention.py)
            use_cpu_rms_norm(model.get_base_model())  # RMSNorm in fewer passes (cpu_norm.py)
    return functools.partial(lora_in_base_dtype, model, None if quantized else base_dtype, device)


def compiler_missing() -> str | None:
    """What torch.compile on a GPU lacks here, if anything: Triton, and the C compiler Triton
    builds its kernel launchers with."""
    if importlib.util.find_spec("triton") is None:
        return "Triton is not installed"
    if not any(shutil.which(name) for name in (os.environ.get("CC"), "cc", "gcc", "clang") if name):
        return "no C compiler found (Triton needs one; set CC or install gcc)"
    return None


def compile_decoder_layers(causal_lm) -> None:
    """torch.compile each decoder layer (one compiled graph serves them all: the layers differ only
    in their weights). Fuses the norms, rotary embedding, activation and LoRA's small products into
    few kernels: on an H100 these elementwise kernels took ~35% of an eager 7B step
    (BENCHMARKS.md, GPU). Not on CPU, where steps were ~15% faster but only after a 347 s compile.
    A layer that fails to compile runs uncompiled (with a warning) rather than ending the run."""
    import torch._dynamo

    torch._dynamo.config.suppress_errors = True
    for layer in causal_lm.get_decoder().layers:
        layer.compile()
