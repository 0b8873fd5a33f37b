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

Why the dot products are written as LLVM IR (_vector_dot_codegen) rather than as a numba loop:
the batch scheduler needs a request's row of a batched product to be bit for bit what it gets
alone, so its answer does not depend on its company. numba's vectorised loop sums in an order
LLVM picks per loop, so a batched kernel could only repeat the single-row loop once per row,
re-reading each weight row from L1 for every request; written with explicit vectors (their
width and count per CPU: vector_plan) and one fixed order, a weight vector is loaded once for
several rows of x and a vector of x once for several weight rows (a tile of sums held in
registers), and every row still gets the same bits. Measured on SmolLM2's shapes against that
numba loop (538 MB fp32, 2-core Xeon with AVX512 + AMX, 2026-12-02): the products of 8 rows 30
ms instead of 41, of one row unchanged (21 ms, memory-bound); of one bf16 row 12 ms instead of 18
(the prefetch keeps the stream going while the widening runs). A numba loop with 16 explicit scalar accumulators was not vectorised (3-5x
slower). End to end: scripts/bench_generate.py and bench_serve.py, BENCHMARKS.md. On a CPU
without FMA (before 2013) the fused multiply-adds become calls to libm's fmaf: the same bits,
several times slower.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import numba
import numpy as np
import torch
from numba import njit, prange, types
from numba.extending import intrinsic

ROWS_PER_TASK = 16  # output rows per parallel task: enough work per task, enough tasks for 2+ threads
ALIGN = 64  # bytes: a cache line, the widest vector load
STORED = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


PREFETCH_BYTES = 1024  # how far ahead of the loads the weight is asked for


def _has_avx512() -> bool:
    """Whether the CPU numba compiles for has AVX-512 (its own features when NUMBA_CPU_FEATURES
    names them, as for a cache built for other machines)."""
    from llvmlite import binding
    from numba.core import config

    features = config.CPU_FEATURES if config.CPU_FEATURES is not None else binding.get_host_cpu_features().flatten()
    return "+avx512f" in features.split(",")


class Plan(NamedTuple):
    lanes: int  # each dot product sums in UNROLL vectors of LANES partial sums
    unroll: int
    weight_rows: int  # a pass reads this many weight rows for up to 4 rows of x (a register tile)
    prompt_rows: int  # prompt pieces of at most this many positions are multiplied here, not by torch


def vector_plan(avx512: bool) -> Plan:
    """How the kernels run on a CPU (with AVX-512 or with AVX2 only). Measured on SmolLM2's
    products (30 layers' q/k/v, o, gate/up and down in fp32, best of 5; scripts/bench_generate.py
    and BENCHMARKS.md for the end to end):
      - with AVX-512 (32 registers of 16 lanes; 2-core Xeon, 2026-12-03, weights in the arena):
        16 lanes x 1, a tile of 4 weight rows x 4 rows of x (16 sums in registers; a step loads 8
        vectors for 16 fused multiply-adds, where one weight row a pass loaded 5 for 4) and the
        next tile asked for while a tile's later passes run. Against 16 lanes x 4 on one weight
        row: 1 row 13.8-14.7 instead of 16.8 ms, 8 rows 16.5-17.9 instead of 20.2, 32 rows 40-47
        instead of 74 (torch 44). 16 x 2 on 3 weight rows, 4 x 6, 4 x 8 or 2 x 8 tiles were no
        faster. Prompt pieces of up to 32 positions here too: 16 rows 27.6 ms against torch's
        39.5, 24 rows 31.4 against 40.9, 32 rows about even (44), 40 rows and more slower;
      - with AVX2 only (16 registers of 8 lanes; 2-core AMD EPYC, Zen 3): the AVX-512 plan of
        16 x 4 on one weight row spilled half its sums to the stack; 8 lanes x 1 took 8 rows'
        products from 62 to 47 ms and 16 rows' from 109 to 80 (one row: 37 and 35 ms,
        memory-bound either way). More partial sums per product (8 x 2, 8 x 4) or more rows of x
        a pass (6, 8) were slower or no faster: there the loads of x from cache, not the
        arithmetic, set the pace. (Tiles of several weight rows, which cut those loads, are not
        measured there yet: one weight row a pass.) torch's fp32 product (MKL) was slower than
        these kernels up to ~40 rows: a prompt piece of 8 / 16 / 32 positions took 137 / 137 /
        178 ms by torch, 60 / 79 / 159 ms here (64: 243 vs 303)."""
    return Plan(16, 1, 4, 32) if avx512 else Plan(8, 1, 1, 32)


PLAN = vector_plan(_has_avx512())
LANES, UNROLL, WEIGHT_ROWS = PLAN.lanes, PLAN.unroll, PLAN.weight_rows


def _vector_dot_codegen(weight_rows: int, count: int, element: str):
    """LLVM IR for the dot products of `weight_rows` consecutive weight rows with `count`
    consecutive rows of x, each (weight row, x row) summed in one fixed order, whatever the tile:
      - UNROLL accumulators of LANES lanes; element i goes to lane i mod LANES of accumulator
        (i // LANES) mod UNROLL, by a fused multiply-add (one rounding), LANES * UNROLL elements a step;
      - the accumulators added as a balanced tree ((a0 + a1) + (a2 + a3) for four), then the
        elements left over LANES at a time into that sum, then its lanes halved and added down to one;
      - the last width mod LANES elements one by one, by scalar fused multiply-adds.
    A step loads each weight vector once for all `count` rows of x and each vector of x once for
    all `weight_rows` rows of the weight (both stay in registers), and asks for each weight row
    `ahead` bytes (a runtime argument) past what it loads, so that streaming the weight from
    memory overlaps the arithmetic.
    element: "f32", "bf16" (uint16 bits: the top half of an fp32) or "f16" (int16 bits)."""
    from llvmlite import ir
    from numba.core import cgutils

    f32, i64, i32 = ir.FloatType(), ir.IntType(64), ir.IntType(32)
    vec = ir.VectorType(f32, LANES)
    step = LANES * UNROLL
    stored = f32 if element == "f32" else ir.IntType(16)
    itemsize = 4 if element == "f32" else 2
    pairs = [(j, k) for j in range(weight_rows) for k in range(count)]

    def const(value):
        return ir.Constant(i64, value)

    def codegen(context, builder, signature, args):
        weight_type, _, x_type, _, out_type = signature.args[:5]
        weight, row, x, first, out, ahead = args[:6]
        module = builder.module
        fma_vec = cgutils.get_or_insert_function(module, ir.FunctionType(vec, [vec] * 3), f"llvm.fma.v{LANES}f32")
        fma_one = cgutils.get_or_insert_function(module, ir.FunctionType(f32, [f32] * 3), "llvm.fma.f32")
        bytes_ptr = ir.IntType(8).as_pointer()
        prefetch = cgutils.get_or_insert_function(
            module, ir.FunctionType(ir.VoidType(), [bytes_ptr, i32, i32, i32]), "llvm.prefetch.p0i8")
        w_array = context.make_array(weight_type)(context, builder, weight)
        x_array = context.make_array(x_type)(context, builder, x)
        o_array = context.make_array(out_type)(context, builder, out)
        rows, width = cgutils.unpack_tuple(builder, w_array.shape, 2)
        w_base = builder.bitcast(w_array.data, stored.as_pointer())
        w_ptrs = [builder.gep(w_base, [builder.mul(builder.add(row, const(j)), width)]) for j in range(weight_rows)]
        x_ptrs = [builder.gep(x_array.data, [builder.mul(builder.add(first, const(k)), width)]) for k in range(count)]

        def widen(value, lanes):
            if element == "f32":
                return value
            if element == "bf16":
                wide = ir.VectorType(i32, lanes) if lanes else i32
                shift = ir.Constant(wide, [16] * lanes) if lanes else ir.Constant(i32, 16)
                return builder.bitcast(builder.shl(builder.zext(value, wide), shift), vec if lanes else f32)
            half = ir.VectorType(ir.HalfType(), lanes) if lanes else ir.HalfType()
            return builder.fpext(builder.bitcast(value, half), vec if lanes else f32)

        def load_w(j, offset):
            pointer = builder.bitcast(builder.gep(w_ptrs[j], [offset]), ir.VectorType(stored, LANES).as_pointer())
            return widen(builder.load(pointer, align=itemsize), LANES)

        def load_x(k, offset):
            return builder.load(builder.bitcast(builder.gep(x_ptrs[k], [offset]), vec.as_pointer()), align=4)

        def loop(name, start, end, stride, carried, body):
            """for i in range(start, end, stride): carried = body(i, carried); the final values."""
            entry = builder.block
            head, inside, after = (builder.append_basic_block(f"{name}.{part}") for part in ("head", "body", "after"))
            builder.branch(head)
            builder.position_at_end(head)
            index = builder.phi(i64)
            index.add_incoming(start, entry)
            phis = [builder.phi(value.type) for value in carried]
            for phi, value in zip(phis, carried):
                phi.add_incoming(value, entry)
            builder.cbranch(builder.icmp_unsigned("<", index, end), inside, after)
            builder.position_at_end(inside)
            updated = body(index, phis)
            index.add_incoming(builder.add(index, const(stride)), builder.block)
            for phi, value in zip(phis, updated):
                phi.add_incoming(value, builder.block)
            builder.branch(head)
            builder.position_at_end(after)
            return phis

        def main_step(i, accumulators):
            for j in range(weight_rows):
                prefetch_at = builder.bitcast(builder.gep(w_ptrs[j], [i]), bytes_ptr)
                for line in range(0, step * itemsize, 64):
                    builder.call(prefetch, [builder.gep(prefetch_at, [builder.add(ahead, const(line))]),
                                            ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)])
            updated = list(accumulators)
            for u in range(UNROLL):
                offset = builder.add(i, const(u * LANES))
                weights = [load_w(j, offset) for j in range(weight_rows)]
                for k in range(count):
                    x_vector = load_x(k, offset)
                    for j in range(weight_rows):
                        place = (j * count + k) * UNROLL + u
                        updated[place] = builder.call(fma_vec, [weights[j], x_vector, accumulators[place]])
            return updated

        zero = ir.Constant(vec, [0.0] * LANES)
        main_end = builder.mul(builder.udiv(width, const(step)), const(step))
        accumulators = loop("steps", const(0), main_end, step, [zero] * (len(pairs) * UNROLL), main_step)
        sums = []
        for p in range(len(pairs)):
            tree = accumulators[p * UNROLL:(p + 1) * UNROLL]
            while len(tree) > 1:  # a balanced tree: UNROLL is a power of two
                tree = [builder.fadd(tree[t], tree[t + 1]) for t in range(0, len(tree), 2)]
            sums.append(tree[0])
        vector_end = builder.mul(builder.udiv(width, const(LANES)), const(LANES))
        sums = loop("vectors", main_end, vector_end, LANES, sums, lambda i, acc: [
            builder.call(fma_vec, [load_w(j, i), load_x(k, i), acc[p]]) for p, (j, k) in enumerate(pairs)])
        totals = []
        for total in sums:
            lanes = LANES
            while lanes > 1:
                lanes //= 2
                low = builder.shuffle_vector(total, total, ir.Constant(ir.VectorType(i32, lanes), list(range(lanes))))
                high = builder.shuffle_vector(total, total, ir.Constant(ir.VectorType(i32, lanes),
                                                                        list(range(lanes, 2 * lanes))))
                total = builder.fadd(low, high)
            totals.append(builder.extract_element(total, ir.Constant(i32, 0)))

        def tail_step(i, acc):
            ws = [widen(builder.load(builder.gep(w_ptrs[j], [i])), 0) for j in range(weight_rows)]
            return [builder.call(fma_one, [ws[j], builder.load(builder.gep(x_ptrs[k], [i])), acc[p]])
                    for p, (j, k) in enumerate(pairs)]
        totals = loop("tail", vector_end, width, 1, totals, tail_step)
        for total, (j, k) in zip(totals, pairs):
            place = builder.add(builder.mul(builder.add(first, const(k)), rows), builder.add(row, const(j)))
            builder.store(total, builder.gep(o_array.data, [place]))
        return context.get_dummy_value()
    return codegen


@intrinsic
def _dot_tile(typingctx, weight, row, x, first, out, ahead, weight_rows, count):
    """out[first + k, row + j] = weight[row + j] . x[first + k] for j < weight_rows, k < count
    (literals), prefetching `ahead` bytes past each load of the weight; every array C-contiguous,
    x and out fp32."""
    elements = {types.float32: "f32", types.uint16: "bf16", types.int16: "f16"}
    if (not isinstance(count, types.IntegerLiteral) or not isinstance(weight_rows, types.IntegerLiteral)
            or weight.dtype not in elements or x.dtype != types.float32
            or out.dtype != types.float32 or any(a.layout != "C" or a.ndim != 2 for a in (weight, x, out))):
        return None  # numba then reports no matching signature
    return (types.void(weight, row, x, first, out, ahead, weight_rows, count),
            _vector_dot_codegen(weight_rows.literal_value, count.literal_value, elements[weight.dtype]))


def _half_widening_symbol() -> None:
    """Where the CPU lacks F16C, LLVM widens fp16 by a call to compiler-rt's __extendhfsf2, which
    numba's JIT cannot resolve (LLVM aborts the process). libgcc has the same function: point the
    JIT at it, so an fp16 checkpoint is widened in software there (exactly) instead of crashing."""
    import ctypes

    from llvmlite import binding

    if binding.address_of_symbol("__extendhfsf2"):
        return
    try:
        function = ctypes.CDLL("libgcc_s.so.1").__extendhfsf2
    except (OSError, AttributeError):
        return  # no libgcc: such a CPU cannot serve fp16 weights here
    binding.add_symbol("__extendhfsf2", ctypes.cast(function, ctypes.c_void_p).value)


_half_widening_symbol()


@njit(nogil=True, cache=True, inline="always")
def _row_tiles(weight, row, x, out, weight_rows):
    """Weight rows row..row + weight_rows (a literal) times every row of x: 4 rows of x a pass,
    then 2, then 1; under 4 rows, one a pass."""
    batch = x.shape[0]
    first = 0
    # a tile's first pass streams it from memory, asking PREFETCH_BYTES ahead; a later pass reads
    # it from cache and asks for the next tile meanwhile (8 rows' products 17 instead of 19.5 ms;
    # 2 rows as two passes 13.2-13.5 ms, as one 14.2-14.9, where one row takes 13.4-13.9)
    ahead, tile_bytes = PREFETCH_BYTES, weight_rows * weight.shape[1] * weight.itemsize
    if batch < 4:
        while first < batch:
            _dot_tile(weight, row, x, first, out, ahead, weight_rows, 1)
            first += 1
            ahead = tile_bytes
        return
    while first + 4 <= batch:
        _dot_tile(weight, row, x, first, out, ahead, weight_rows, 4)
        first += 4
        ahead = tile_bytes
    if first + 2 <= batch:
        _dot_tile(weight, row, x, first, out, ahead, weight_rows, 2)
        first += 2
        ahead = tile_bytes
    if first < batch:
        _dot_tile(weight, row, x, first, out, ahead, weight_rows, 1)


@njit(parallel=True, nogil=True, cache=True)
def _products(weight, x, out):
    """out[b] = weight @ x[b] for each row b of x [B, in]; one compiled version per storage dtype.
    Without the GIL, so the server's other threads (coglet's event loop, the streams) run meanwhile.
    Parallel over blocks of weight rows; each block is streamed in tiles of WEIGHT_ROWS rows (a
    last few one at a time), each tile once for 4 rows of x at a time, and every (row, b) is
    summed in _vector_dot_codegen's one order, so a row of x gets the same bits alone or with any
    company (tests/serving/lean/test_matvec.py)."""
    rows = weight.shape[0]
    if x.shape[1] != weight.shape[1] or out.shape[0] != x.shape[0] or out.shape[1] != rows:
        raise ValueError("matvec: x [B, in] and out [B, out] do not fit the weight [out, in]")
    for task in prange((rows + ROWS_PER_TASK - 1) // ROWS_PER_TASK):
        row, end = task * ROWS_PER_TASK, min(rows, (task + 1) * ROWS_PER_TASK)
        while row + WEIGHT_ROWS <= end:
            _row_tiles(weight, row, x, out, WEIGHT_ROWS)
            row += WEIGHT_ROWS
        while row < end:
            _row_tiles(weight, row, x, out, 1)
            row += 1


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
            _products(np.zeros((1, 4), dtype=BITS[dtype]), x[None], np.empty((1, 1), np.float32))
    finally:
        numba.set_num_threads(threads)


class Matrix:
    """A weight [out, in] as stored: `bits` in BITS[dtype]."""

    def __init__(self, bits: np.ndarray, dtype: str):
        self.bits, self.dtype = bits, dtype
        self.shape, self.nbytes = bits.shape, bits.nbytes

    def matvec(self, x: np.ndarray) -> np.ndarray:
        """weight @ x for one fp32 vector x [in] -> [out], fp32."""
        return self.matmat(x[None])[0]

    def matmat(self, x: np.ndarray) -> np.ndarray:
        """weight @ x[b] for each fp32 row of x [B, in] -> [B, out], fp32, the weight read once."""
        out = np.empty((x.shape[0], self.shape[0]), dtype=np.float32)
        _products(self.bits, np.ascontiguousarray(x, dtype=np.float32), out)
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
