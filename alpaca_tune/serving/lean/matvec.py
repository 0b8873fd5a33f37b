"""Matrix-vector products for decoding on CPU, over weights kept in their checkpoint's dtype.

Decoding one token reads every weight once, so its speed is how fast the weights stream from
memory. Two things decide that here (figures in BENCHMARKS.md, decoding):
- the bytes: a bf16 or fp16 checkpoint served as fp32 reads twice the bytes it needs. These
  kernels read bf16 and fp16 weights as stored and widen them to fp32 in registers, so every
  product still equals the fp32 product of the same values (summed in another order);
- the streaming: numpy's OpenBLAS pays a per-call hand-off on these small products (576 x 576
  streams at ~15 GB/s where a `sum` reads ~25-50), and PyTorch's CPU products stream ~10 GB/s.
  A numba kernel, parallel over output rows, streams every shape at about the `sum`'s rate.
Weights live in one arena (`WeightArena`) that numpy backs with transparent huge pages: the
hardware prefetcher stops at each 4 KB page, and a `sum` over huge pages reads ~10% faster.

Weights are [out, in] (nn.Linear's layout): each output is one contiguous dot product.
"""

from __future__ import annotations

import functools

import numba
import numpy as np
import torch
from numba import njit, prange, types
from numba.extending import intrinsic

ROWS_PER_TASK = 16  # output rows per parallel task: enough work per task, enough tasks for 2+ threads
ALIGN = 64  # bytes: a cache line, the widest vector load
STORED = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


@intrinsic
def _widen(typingctx, value):
    """A stored weight element as fp32 (exact): fp32 as it is; uint16 holds bf16's bits, the top
    half of an fp32 (shifted up and reinterpreted); int16 holds fp16's bits (LLVM's own half type
    widens them, by F16C's conversion where the CPU has it)."""
    def codegen(context, builder, signature, args):
        from llvmlite import ir

        (element,) = args
        if value == types.float32:
            return element
        if value == types.uint16:
            wide = builder.shl(builder.zext(element, ir.IntType(32)), ir.Constant(ir.IntType(32), 16))
            return builder.bitcast(wide, ir.FloatType())
        return builder.fpext(builder.bitcast(element, ir.HalfType()), ir.FloatType())
    if value in (types.float32, types.uint16, types.int16):
        return types.float32(value), codegen
    return None


@njit(parallel=True, fastmath=True, cache=True)
def _matvec(weight, x, out):
    """out = weight @ x; one compiled version per storage dtype (see _widen)."""
    rows, width = weight.shape
    for task in prange((rows + ROWS_PER_TASK - 1) // ROWS_PER_TASK):
        for row in range(task * ROWS_PER_TASK, min(rows, (task + 1) * ROWS_PER_TASK)):
            total = np.float32(0)
            for i in range(width):
                total += _widen(weight[row, i]) * x[i]
            out[row] = total


@njit(parallel=True, fastmath=True, cache=True)
def _matmat(weight, x, out):
    """out[b] = weight @ x[b] for every row b of x [B, in]: each weight row is read from memory
    once for all B rows (it stays in L1 meanwhile), so a batch of B tokens costs about one token's
    memory traffic. Each (row, b) sum runs the same loop as _matvec, so a row's result is the one
    it gets alone (tests/serving/lean/test_matvec.py checks they are equal bit for bit)."""
    rows, width = weight.shape
    batch = x.shape[0]
    for task in prange((rows + ROWS_PER_TASK - 1) // ROWS_PER_TASK):
        for row in range(task * ROWS_PER_TASK, min(rows, (task + 1) * ROWS_PER_TASK)):
            for b in range(batch):
                total = np.float32(0)
                for i in range(width):
                    total += _widen(weight[row, i]) * x[b, i]
                out[b, row] = total


# How each dtype is stored: numpy has no bf16, and numba no fp16 arrays, so both as 16-bit integers,
# told apart by signedness.
BITS = {"float32": np.float32, "bfloat16": np.uint16, "float16": np.int16}


def warm_up(dtypes: set[str]) -> None:
    """Load the kernel for each stored dtype in `dtypes` (numba's first call costs ~0.2 s: its
    compiler and the cached machine code; ~1 s a dtype on the first start after an install, when
    it compiles), so that the first token does not pay for it. On one thread: with numba's second
    (OpenMP) thread started here, coglet lost the setup's last log line in about half of the
    server starts (tests/test_http_predict.py), likely because that thread spins on the other core
    for a while after each parallel call, just when coglet's own threads need it."""
    x = np.zeros(4, dtype=np.float32)
    threads = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        for dtype in dtypes:
            _matvec(np.zeros((1, 4), dtype=BITS[dtype]), x, np.empty(1, np.float32))
            _matmat(np.zeros((1, 4), dtype=BITS[dtype]), x[None], np.empty((1, 1), np.float32))
    finally:
        numba.set_num_threads(threads)


class Matrix:
    """A weight [out, in] as stored: `bits` in BITS[dtype]."""

    def __init__(self, bits: np.ndarray, dtype: str):
        self.bits, self.dtype = bits, dtype
        self.shape, self.nbytes = bits.shape, bits.nbytes

    def matvec(self, x: np.ndarray) -> np.ndarray:
        """weight @ x for one fp32 vector x [in] -> [out], fp32."""
        out = np.empty(self.shape[0], dtype=np.float32)
        _matvec(self.bits, x, out)
        return out

    def matmat(self, x: np.ndarray) -> np.ndarray:
        """weight @ x[b] for each fp32 row of x [B, in] -> [B, out], fp32, the weight read once."""
        out = np.empty((x.shape[0], self.shape[0]), dtype=np.float32)
        _matmat(self.bits, np.ascontiguousarray(x), out)
        return out

    def float32(self, scratch: np.ndarray | None = None) -> np.ndarray:
        """The weight as fp32 [out, in], for products over many rows: the weight itself when stored
        fp32, else widened into `scratch` (fp32, at least as many elements; reusing one buffer
        was 3x faster than a fresh array per matrix) or a new array."""
        if self.dtype == "float32":
            return self.bits
        out = np.empty(self.shape, np.float32) if scratch is None else scratch[:self.bits.size].reshape(self.shape)
        torch.from_numpy(out).copy_(self._as_torch(self.bits))
        return out

    def rows(self, indices: list[int]) -> np.ndarray:
        """Rows `indices` of the weight as fp32 [len(indices), in] (an embedding lookup)."""
        rows = self.bits[indices]
        return rows if self.dtype == "float32" else self._as_torch(rows).float().numpy()

    def _as_torch(self, bits: np.ndarray) -> torch.Tensor:
        """16-bit `bits` as the torch tensor of their dtype (no copy)."""
        return torch.from_numpy(bits.view(np.int16)).view(getattr(torch, self.dtype))


def stored_dtype(parts: list[torch.Tensor]) -> torch.dtype:
    """The dtype a matrix made of `parts` (stacked) is stored in: theirs, widened as torch.cat
    widens a mix (an fp32 q merged with an adapter and a bf16 k give fp32); fp32 if unsupported."""
    dtype = functools.reduce(torch.promote_types, (part.dtype for part in parts))
    return dtype if dtype in STORED else torch.float32


class WeightArena:
    """One allocation holding every weight of a model, carved into aligned pieces.

    numpy asks the kernel for transparent huge pages on allocations of 4 MB and more (madvise), so
    one arena gets them for small matrices too; PyTorch's CPU allocator does not ask."""

    def __init__(self, matrices: list[list[torch.Tensor]]):
        """Room for `matrices`, each given as the parts it will be stacked from."""
        sizes = [self._padded(sum(part.numel() for part in parts) * stored_dtype(parts).itemsize)
                 for parts in matrices]
        self._buffer = np.empty(sum(sizes) + ALIGN, dtype=np.uint8)
        self._offset = -self._buffer.ctypes.data % ALIGN

    @staticmethod
    def _padded(nbytes: int) -> int:
        return -(-nbytes // ALIGN) * ALIGN

    def store(self, parts: list[torch.Tensor]) -> Matrix:
        """Copy 2-D parts in, stacked along their first dimension, as one matrix."""
        torch_dtype = stored_dtype(parts)
        dtype = STORED[torch_dtype]
        tensor = torch.cat([part.to(torch_dtype) for part in parts]) if len(parts) > 1 else parts[0].to(torch_dtype)
        source = tensor.contiguous().view(torch.int16 if dtype != "float32" else torch.float32).numpy()
        piece = self._buffer[self._offset:self._offset + source.nbytes].view(BITS[dtype]).reshape(source.shape)
        self._offset += self._padded(source.nbytes)
        piece[...] = source.view(piece.dtype)
        return Matrix(piece, dtype)
