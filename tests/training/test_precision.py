"""precision: fp32 and bf16 as asked; auto takes whichever of bf16 and fp32 this CPU runs faster."""

import pytest
import torch

from alpaca_tune.training import precision
from alpaca_tune.training.precision import PrecisionError, pick_faster, training_dtype

CPU = torch.device("cpu")


@pytest.mark.parametrize("bf16, fp32, expected", [
    (2.0, 10.0, torch.bfloat16),  # native bf16 (AVX512-BF16 / AMX): ~5x faster products
    (49.0, 10.0, torch.float32),  # emulated bf16 (AVX512 alone): ~5x slower
    (9.5, 10.0, torch.float32),  # a tie goes to fp32, whose roundings are finer
])
def test_the_faster_dtype_is_picked(bf16, fp32, expected):
    assert pick_faster(bf16, fp32) == expected


def test_auto_on_this_cpu_follows_its_own_timings():
    dtype, probe = precision.cpu_auto_dtype()
    assert training_dtype("auto", CPU) == dtype
    if probe.get("bf16_supported") is False:
        assert dtype == torch.float32
    else:
        assert dtype == pick_faster(probe["bf16_ms"], probe["fp32_ms"])
        assert probe["bf16_ms"] > 0 and probe["fp32_ms"] > 0


def test_the_probe_times_real_products():
    small, large = (precision.product_seconds(torch.float32, rows=rows, width=256, repeats=2) for rows in (16, 1024))
    assert large > small > 0  # 64x the work takes longer


def test_given_precisions(monkeypatch):
    assert training_dtype("fp32", CPU) == torch.float32
    monkeypatch.setattr(precision, "bf16_supported", lambda device: False)
    with pytest.raises(PrecisionError, match="precision=bf16: this CPU has no bf16 support; use precision=fp32"):
        training_dtype("bf16", CPU)
