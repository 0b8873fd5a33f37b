"""matvec.py: the decoding kernels widen bf16/fp16 weights exactly and compute weight @ x, checked
against float64 products and against torch's own widening, at shapes that end mid-vector."""

import numpy as np
import pytest
import torch

from alpaca_tune.serving.lean.matvec import ALIGN, WeightArena

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def stored(*tensors):
    arena = WeightArena([[t] for t in tensors])
    return [arena.store([t]) for t in tensors]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (37, 53), (130, 1000), (16, 17)])
def test_matvec_equals_float64_product(dtype, shape):
    torch.manual_seed(0)
    weight = torch.randn(shape).to(dtype)
    x = np.random.default_rng(1).standard_normal(shape[1]).astype(np.float32)
    (matrix,) = stored(weight)
    got = matrix.matvec(x)
    exact = weight.double().numpy() @ x.astype(np.float64)
    # fp32 sums of `width` terms, in any order: error within width * eps * sum |w x|
    bound = shape[1] * np.finfo(np.float32).eps * (np.abs(weight.double().numpy()) @ np.abs(x.astype(np.float64)))
    assert got.dtype == np.float32 and got.shape == (shape[0],)
    assert np.all(np.abs(got - exact) <= bound + 1e-30)


@pytest.mark.parametrize("dtype", DTYPES)
def test_widening_is_exact_for_every_kind_of_value(dtype):
    """One-hot inputs read single weights back: equal to torch's own widening for subnormals, the
    largest finite values, negative zero and ordinary values (and bit for bit for whole rows)."""
    info = torch.finfo(dtype)
    values = torch.tensor([0.0, -0.0, 1.0, -2.5, info.max, -info.max, info.tiny, info.tiny / 4, -info.tiny / 8,
                           3.14159, 1e-3, 65000.0 if dtype == torch.float16 else 1e30], dtype=torch.float64)
    weight = values.to(dtype).reshape(3, 4)
    (matrix,) = stored(weight)
    widened = weight.float().numpy()
    for column in range(4):
        one_hot = np.zeros(4, np.float32)
        one_hot[column] = 1
        got = matrix.matvec(one_hot)  # a sum from +0, so -0 comes back as +0: compared as values
        assert np.array_equal(got, widened[:, column]), column
    assert np.array_equal(matrix.float32().view(np.int32), widened.view(np.int32))
    assert np.array_equal(matrix.rows([2, 0]).view(np.int32), widened[[2, 0]].view(np.int32))


def test_arena_keeps_dtypes_aligns_and_copies():
    torch.manual_seed(0)
    tensors = [torch.randn(3, 5).to(dtype) for dtype in DTYPES] + [torch.randn(2, 7, dtype=torch.float64)]
    matrices = stored(*tensors)
    assert [m.dtype for m in matrices] == ["float32", "bfloat16", "float16", "float32"]
    assert [m.nbytes for m in matrices] == [60, 30, 30, 56]  # float64 is stored as fp32
    for matrix, tensor in zip(matrices, tensors):
        assert matrix.bits.ctypes.data % ALIGN == 0
        assert np.array_equal(matrix.float32(), tensor.float().numpy())
    tensors[0].zero_()  # a copy: the arena does not share the tensors' memory
    assert np.abs(matrices[0].float32()).sum() > 0


def test_parts_are_stacked_in_the_widest_dtype():
    """q/k/v are stored as one matrix: an fp32 part (an adapter merged into it) makes it all fp32."""
    torch.manual_seed(0)
    half = [torch.randn(4, 6).to(torch.bfloat16), torch.randn(2, 6).to(torch.bfloat16)]
    mixed = [torch.randn(3, 6), torch.randn(2, 6).to(torch.bfloat16)]
    arena = WeightArena([half, mixed])
    stacked_half, stacked_mixed = arena.store(half), arena.store(mixed)
    assert (stacked_half.dtype, stacked_half.shape, stacked_half.nbytes) == ("bfloat16", (6, 6), 72)
    assert (stacked_mixed.dtype, stacked_mixed.shape) == ("float32", (5, 6))
    assert np.array_equal(stacked_half.float32(), torch.cat(half).float().numpy())
    assert np.array_equal(stacked_mixed.float32(), torch.cat([mixed[0], mixed[1].float()]).numpy())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch", [1, 3, 7, 16])  # blocks of 4, 2 and 1
def test_matmat_rows_are_the_matvec_of_each_row_bit_for_bit(dtype, batch):
    """The batch scheduler's products: each row of a batched product is exactly what that row
    gets alone, so a request's answer does not depend on what else is in its batch."""
    torch.manual_seed(0)
    (matrix,) = stored(torch.randn(130, 1000).to(dtype))
    x = np.random.default_rng(2).standard_normal((batch, 1000)).astype(np.float32)
    got = matrix.matmat(x)
    assert got.shape == (batch, 130) and got.dtype == np.float32
    for row in range(batch):
        assert np.array_equal(got[row], matrix.matvec(x[row]))


def test_shapes_that_do_not_fit_are_refused_not_read_past():
    (matrix,) = stored(torch.randn(4, 64))
    with pytest.raises(ValueError, match="do not fit the weight"):
        matrix.matvec(np.zeros(16, np.float32))


def test_fp16_widens_without_f16c_too():
    """A CPU without F16C (numba told to compile for a generic x86-64) widens fp16 in software:
    the same products, no abort."""
    import subprocess
    import sys

    script = ("import numpy as np, torch\n"
              "from alpaca_tune.serving.lean.matvec import WeightArena\n"
              "w = torch.randn(37, 70).to(torch.float16)\n"
              "m = WeightArena([[w]]).store([w])\n"
              "x = np.random.default_rng(0).standard_normal(70).astype(np.float32)\n"
              "exact = w.double().numpy() @ x.astype(np.float64)\n"
              "print(float(np.abs(m.matvec(x) - exact).max()))\n")
    import os

    env = {**os.environ, "NUMBA_CPU_NAME": "generic", "NUMBA_CACHE_DIR": os.path.join(os.environ.get("TMPDIR", "/tmp"),
                                                                                      "numba-generic-cache")}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert float(done.stdout.strip().splitlines()[-1]) < 1e-3
