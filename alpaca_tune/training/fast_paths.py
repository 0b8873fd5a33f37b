"""The training speed-ups that depend on the device and dtype, switched on in one place.

loop.py calls switch_on_fast_paths once, after LoRA is attached; what each one buys is measured
in BENCHMARKS.md (CPU: allocator.py, cpu/dropout.py, cpu/attention.py; bf16: LoRA
products under autocast; GPU: compiled decoder layers). Each swap of a library's internals counts
what it replaced; one that replaces nothing where it should (a transformers or PEFT upgrade
changed what it swaps) says so at WARNING and stays off, and the counts go into
training_config.json ("ran": "fast_paths").

$ALPACA_TUNE_FAST_PATHS_OFF (comma-separated names, as in those counts) leaves fast paths off:
how scripts/bench_train.py measures what each one buys in whole runs.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..allocator import keep_freed_memory
from .cpu.attention import use_cpu_attention
from .cpu.dropout import use_cpu_dropout

log = logging.getLogger(__name__)

OFF_ENV = "ALPACA_TUNE_FAST_PATHS_OFF"
NAMES = ("bf16_lora_products", "compiled_layers", "malloc_keeps_freed_memory", "cpu_dropout", "cpu_attention",
         "shared_preamble")


def wanted(name: str) -> bool:
    """False when $ALPACA_TUNE_FAST_PATHS_OFF names this fast path."""
    assert name in NAMES, name
    return name not in {part.strip() for part in os.environ.get(OFF_ENV, "").split(",")}


@dataclass
class FastPaths:
    """What switch_on_fast_paths did: the context each forward runs in, and per fast path what
    it replaced (a count of modules, or whether it is on)."""
    compute: Callable[[], contextlib.AbstractContextManager]
    switched_on: dict[str, int | bool] = field(default_factory=dict)


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
                         compile_layers: bool = False) -> FastPaths:
    """Every speed-up this device and dtype allow, in one place. The forward context runs the
    LoRA products in bf16 for an unquantized bf16 base (else it does nothing)."""
    bf16_lora = base_dtype == torch.bfloat16 and not quantized and wanted("bf16_lora_products")
    fast = FastPaths(functools.partial(lora_in_base_dtype, model, torch.bfloat16 if bf16_lora else None, device),
                     {"bf16_lora_products": bf16_lora})
    causal_lm = model.get_base_model()
    if compile_layers and device.type == "cuda" and not quantized and wanted("compiled_layers"):
        missing = compiler_missing()
        if missing:
            log.warning("torch_compile: %s; training with uncompiled layers (slower)", missing)
        fast.switched_on["compiled_layers"] = 0 if missing else compile_decoder_layers(causal_lm)
    if device.type == "cpu":
        switches = [("malloc_keeps_freed_memory", keep_freed_memory),  # each step re-allocates the same tensors
                    ("cpu_dropout", lambda: use_cpu_dropout(model))]  # same dropout, cheaper masks
        if base_dtype == torch.bfloat16:
            switches.append(("cpu_attention", lambda: use_cpu_attention(causal_lm)))  # bf16 products, blockwise
        for name, switch_on in switches:
            fast.switched_on[name] = switch_on() if wanted(name) else 0
    log.info("fast paths: %s", ", ".join(f"{name} {value}" for name, value in fast.switched_on.items()))
    return fast


def compiler_missing() -> str | None:
    """What torch.compile on a GPU lacks here, if anything: Triton, and the C compiler Triton
    builds its kernel launchers with."""
    if importlib.util.find_spec("triton") is None:
        return "Triton is not installed"
    if not any(shutil.which(name) for name in (os.environ.get("CC"), "cc", "gcc", "clang") if name):
        return "no C compiler found (Triton needs one; set CC or install gcc)"
    return None


def compile_decoder_layers(causal_lm) -> int:
    """torch.compile each decoder layer (one compiled graph serves them all: the layers differ only
    in their weights). Fuses the norms, rotary embedding, activation and LoRA's small products into
    few kernels: on an H100 these elementwise kernels took ~35% of an eager 7B step
    (BENCHMARKS.md, GPU). Not on CPU, where steps were ~15% faster but only after a 347 s compile.
    A layer that fails to compile runs uncompiled (with a warning) rather than ending the run."""
    import torch._dynamo

    torch._dynamo.config.suppress_errors = True
    layers = causal_lm.get_decoder().layers
    for layer in layers:
        layer.compile()
    return len(layers)
