"""What a server refuses to spend on one caller's input, read once from the environment at setup.

    ALPACA_TUNE_MAX_UNPACKED_BYTES   bytes an adapter archive may unpack (or download) to; 4 GiB:
                                     a rank-64 LoRA on every linear layer of a 70B is ~3.6 GB in fp32
    ALPACA_TUNE_MAX_ARCHIVE_MEMBERS  files and folders in an archive; an adapter archive has ~6
    ALPACA_TUNE_MAX_PREDICT_SECONDS  how long one prediction may run before it ends as failed
    COG_MAX_CONCURRENCY              requests served at once (coglet's slots; batched); default 16
    ALPACA_TUNE_KV_BUDGET_TOKENS     KV-cache positions all running requests may reserve together;
                                     default: a full context per slot, at most a quarter of the
                                     memory available at setup
    ALPACA_TUNE_MAX_CACHED_ADAPTERS  per-request adapters (lora_weights) kept loaded; 16
    ALPACA_TUNE_MAX_CACHED_ADAPTER_BYTES  ... and their bytes at most; 2 GiB
    ALPACA_TUNE_LOAD_LOG_SECONDS     how often a busy server logs its batch size and KV-cache use; 10
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..errors import UserError

# Deflated safetensors of trained weights shrink ~1.1x; all-zero tensors (an untrained lora_B)
# can reach ~1000x, but only half an adapter is ever zero. A bomb is thousands to one.
MAX_COMPRESSION_RATIO = 100
RATIO_CHECKED_AFTER = 16 << 20  # bytes unpacked before the ratio counts (tiny files vary widely)


DEFAULT_CONCURRENCY = 16
CONCURRENCY_ENV = "COG_MAX_CONCURRENCY"


def concurrency() -> int:
    """The requests a server takes at once: $COG_MAX_CONCURRENCY (what coglet reads), else 16."""
    text = os.environ.get(CONCURRENCY_ENV, "")
    try:
        value = int(text) if text else DEFAULT_CONCURRENCY
    except ValueError:
        value = 0
    if value < 1:
        raise UserError(f"${CONCURRENCY_ENV}={text!r}: must be a positive integer")
    return value


@dataclass(frozen=True)
class Limits:
    max_unpacked_bytes: int = 4 << 30
    max_archive_members: int = 1000
    max_predict_seconds: float = 600.0
    kv_budget_tokens: int = 0  # 0: instruct.default_kv_budget
    max_cached_adapters: int = 16
    max_cached_adapter_bytes: int = 2 << 30
    load_log_seconds: float = 10.0

    @classmethod
    def from_env(cls) -> Limits:
        def number(name: str, default, kind):
            text = os.environ.get(name, "")
            if not text:
                return default
            try:
                value = kind(text)
            except ValueError:
                value = 0
            if not value > 0:
                raise UserError(f"${name}={text!r}: must be a positive number")
            return value
        return cls(number("ALPACA_TUNE_MAX_UNPACKED_BYTES", cls.max_unpacked_bytes, int),
                   number("ALPACA_TUNE_MAX_ARCHIVE_MEMBERS", cls.max_archive_members, int),
                   number("ALPACA_TUNE_MAX_PREDICT_SECONDS", cls.max_predict_seconds, float),
                   number("ALPACA_TUNE_KV_BUDGET_TOKENS", cls.kv_budget_tokens, int),
                   number("ALPACA_TUNE_MAX_CACHED_ADAPTERS", cls.max_cached_adapters, int),
                   number("ALPACA_TUNE_MAX_CACHED_ADAPTER_BYTES", cls.max_cached_adapter_bytes, int),
                   number("ALPACA_TUNE_LOAD_LOG_SECONDS", cls.load_log_seconds, float))
