"""The machine the code runs on: which device to use, and a description to print beside figures.

CPU speed differs between machines of one name (one has AVX512-BF16 and AMX, another only
AVX512), so every measurement and every training run records the CPU model and the flags that
decide its speed.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import torch

# The instruction-set flags that change which kernels are fast (bf16 products above all).
SPEED_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_tile")


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@functools.cache
def _cpuinfo() -> dict[str, str]:
    """The first processor's entry of /proc/cpuinfo ({} where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    entry = {}
    for line in text.split("\n\n")[0].splitlines():
        key, _, value = line.partition(":")
        entry[key.strip()] = value.strip()
    return entry


def cpu_model() -> str:
    import platform

    return _cpuinfo().get("model name") or platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    """Which of SPEED_FLAGS this CPU has."""
    present = set(_cpuinfo().get("flags", "").split())
    return [flag for flag in SPEED_FLAGS if flag in present]


def describe() -> dict:
    """What a figure or a training run should name: CPU model, cores, speed flags, and the GPU."""
    info = {"cpu": cpu_model(), "cpu_cores": len(os.sched_getaffinity(0)), "cpu_flags": cpu_flags(),
            "torch": torch.__version__}
    if os.environ.get("ONEDNN_MAX_CPU_ISA"):  # oneDNN (torch's CPU products) kept below the CPU's ISA
        info["onednn_max_cpu_isa"] = os.environ["ONEDNN_MAX_CPU_ISA"]
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def describe_line() -> str:
    """describe() on one line, for benchmark output."""
    info = describe()
    text = f"{info['cpu']}, {info['cpu_cores']} cores, flags: {' '.join(info['cpu_flags']) or 'none of ' + ' '.join(SPEED_FLAGS)}"
    if "onednn_max_cpu_isa" in info:
        text += f"; oneDNN limited to {info['onednn_max_cpu_isa']}"
    return text + (f"; GPU: {info['gpu']}" if "gpu" in info else "")
