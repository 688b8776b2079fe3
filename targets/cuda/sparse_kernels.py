"""Sparse fp32 matmul kernels for NVIDIA GPUs, written directly in low-level TIR.

Every kernel computes ``y[M, N] = x[M, K] @ W[K, N]`` (or ``gate(x) @ W``) for a small
batch, ``M = 1 .. MAX_ROWS``, and takes its operands in the order of the CPU kernel of the
same name in ``targets.cpu.sparse_kernels``, so that either can be called for the same
op. The loops carry explicit thread bindings (``blockIdx.*``, ``threadIdx.x``), so TVM
compiles them as written (``tirx.is_scheduled``); ``targets.cuda.codegen`` turns them
into CUDA source and PTX.

Weight formats and kernels (one thread per weight element per step, so that a warp
reads consecutive addresses):

``csr`` -- ``encode(W, "csr")``, ``W^T`` by output row::

    y[m, i] = sum_{j in [indptr[i], indptr[i+1])} values[j] * x[m, indices[j]]

  One warp per output row ``i``, ``CSR_WARPS`` rows per thread block. Lane ``l`` takes
  the row's nonzeros ``l, l + 32, ...``, ``SPARSE_UNROLL`` of them per step (coalesced
  reads of ``values`` and ``indices``, gathers of ``x`` from L1/L2); the 32 lane sums per
  row of ``x`` are then reduced through shared memory (see "Reductions").

``bsr`` -- ``encode(W, "bsr", (R, C))``, ``W^T`` zero-padded to whole ``R x C`` blocks::

    y[m, ib*R + r] = sum_{b in [indptr[ib], indptr[ib+1])} sum_c
                         values[b, r, c] * x[m, indices[b]*C + c]

  A group of ``G = max(BSR_GROUP, R*C)`` threads per block row; thread ``e`` of the
  group owns position ``(r, c) = divmod(e % (R*C), C)`` of blocks ``e // (R*C)``,
  ``+ G / (R*C)``, ..., so the group reads each step's ``G`` values as one contiguous
  run (``SPARSE_UNROLL`` steps at a time). Rows of the last block row past ``n`` are
  never written, and columns past ``k`` of the last block column never read (their
  stored values are the zero padding).

``gated`` (activation sparsity, dense weight; the TEAL design) -- ``y = gate(x) @ W``
with ``gate(x)[m, k] = x[m, k] if |x[m, k]| > t else 0`` (``passes.sparse_ops``'s
``Greater``), ``t`` float32 of shape [1] or [K]. ``W`` is the plain row-major [K, N]
weight, so all the weights an input ``k`` touches are one contiguous row (column-major
in torch's [out, in] convention). The grid is (``ceil(N / 32)`` column tiles, ``k_parts``
slices of K): a block has ``GATED_WARPS`` warps, warp ``w`` takes rows ``w, w + 8, ...``
of its slice (``GATED_ROW_UNROLL`` at a time) and lane ``l`` column ``l`` of its tile.
For each row the warp computes the gate in the kernel and skips the row (a warp-uniform
branch) when no row of ``x`` is active there, so an inactive input costs no weight read
at all. Split-K: the warps' sums are reduced in shared memory into one partial sum per
(slice, m, column) in a global workspace ``partials[k_parts, m * n]`` (allocated by TVM
on the device at each call), and a second kernel adds the ``k_parts`` partials into
``y``. There are no atomics, so the result does not depend on the order blocks run in.

``dual`` (activation sparsity and sparse weight) -- the same grid, gate and split-K as
``gated``, with each 32-column word of each row of ``W`` stored as a bitmask::

    bits[k, j]     uint32, bit l set  <=>  W[k, 32 j + l] != 0
    offsets[k, j]  int32, where the nonzeros of word (k, j) start in values
    W[k, 32 j + l] = values[offsets[k, j] + popcount(bits[k, j] & (2^l - 1))]  (if set)

  ``pack_dual_weight`` / ``unpack_dual_weight`` convert. The values are ``W``'s nonzeros
  in row-major order, so an active row's nonzeros within one tile are one contiguous run
  that the warp reads coalesced (lane ``l`` loads only when its bit is set), and an
  inactive row reads neither its bits nor its values. Per weight this stores 4 bytes per
  nonzero plus 0.25 bytes (bits and offsets): at 50 % weight sparsity 2.25 bytes against
  4 dense, and against 6 for CSR with int16 indices.

Reductions. Each kernel runs as consecutive phases inside a thread block, each phase one
loop nest bound to ``threadIdx.x``: (1) every thread accumulates its partial sums in
registers and writes them to a shared buffer ``lanes[item, lane]``; (2) when a sum has
more than 8 lanes, a fold phase adds them into a narrower shared buffer (``fold``); (3)
one thread per output item adds the remaining lanes and writes ``y`` (or the split-K
partials). A phase only reads shared buffers that earlier phases wrote, and writes one
that it does not read, so TVM's ``ThreadSync`` pass inserts a ``__syncthreads()`` between
phases and none inside one; no warp shuffles are used.

Checking without a GPU. Because of that phase structure, running every thread-bound loop
serially (``serial_copy``) computes exactly what the GPU does, up to the order of fp32
additions; the tests build that serial copy for the host with LLVM and compare it with
numpy, and compile the real kernels with nvcc to PTX. Running the kernels on a GPU is
tested by the ``gpu``-marked tests only, which are skipped where there is no CUDA device;
the GPU execution and speed of these kernels have not been verified in this repository
yet.
"""

from __future__ import annotations

import numpy as np

# The argument checks and function attributes are the CPU kernels' own: both sets take
# the same arguments and are scheduled by hand.
from targets.cpu.sparse_kernels import (
    BSR_BLOCK_SIDES,
    _check_count,
    _check_gate_args,
    _func_attrs,
    _check_index_dtype,
    _check_sizes,
)

#: Rows of ``x`` a kernel takes: the per-thread accumulators are ``m`` registers, and a
#: larger batch is no longer a matrix-vector product (dense GEMM schedules serve it).
MAX_ROWS = 8
#: Threads in a warp.
WARP = 32
#: Output rows (one warp each) per thread block of the CSR kernel.
CSR_WARPS = 4
#: Steps of the CSR and BSR loops over a row's nonzeros (or blocks) issued together,
#: unrolled, so that a warp has that many independent weight loads in flight.
SPARSE_UNROLL = 4
#: Threads per block row of the BSR kernel (at least ``R * C``): there are ``R`` times
#: fewer block rows than rows, so several warps per block row keep enough loads in flight.
BSR_GROUP = 128
#: Threads per thread block the BSR kernel aims at.
BSR_THREADS = 128
#: Warps per thread block of the gated and dual kernels; each takes its own rows of the
#: block's slice of K.
GATED_WARPS = 8
#: Rows of ``W`` a warp of the gated and dual kernels handles per step, unrolled, so that
#: their gates and then their (predicated) weight loads are issued together rather than
#: one latency at a time.
GATED_ROW_UNROLL = 4
#: Thread blocks the gated and dual kernels aim at when ``k_parts`` is not given: about
#: eight resident blocks of 256 threads on each of the 108 (A100) to 132 (H100) SMs,
#: twice over.
GATED_TARGET_BLOCKS = 2048
#: Threads per block of the kernel that adds the split-K partials.
REDUCE_THREADS = 256
#: The widest lane sum that the last reduction phase adds serially; wider ones are folded
#: first (see "Reductions" in the module docstring).
SERIAL_LANES = 8


def _check_rows(m: int) -> None:
    _check_sizes(m=m)
    if m > MAX_ROWS:
        raise ValueError(f"the CUDA sparse kernels take at most {MAX_ROWS} rows of x, got m={m}")


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _fold_width(lanes: int) -> int:
    """Lanes left after the fold phase: all of them up to ``SERIAL_LANES``, else about
    the square root, so that the fold and the last phase each add a few values."""
    if lanes <= SERIAL_LANES:
        return lanes
    return 1 << ((lanes.bit_length() - 1) // 2)


def _fold_macro(threads: int):
    """A macro ``fold(lanes, folded, items, width)``: one phase of the block's ``threads``
    threads computing ``folded[i, w] = sum_u lanes[i, w + u * width]``."""
    from tvm.script import tirx as T

    @T.macro
    def fold(lanes, folded, items, width):
        for t in T.thread_binding(threads, thread="threadIdx.x"):
            for u in range(_ceil_div(items * width, threads)):
                slot = t + u * threads  # (item, lane left) = divmod(slot, width)
                if slot < items * width:
                    total = T.alloc_buffer((1,), "float32", scope="local")
                    total[0] = T.float32(0)
                    for f in range(lanes.shape[1] // width):
                        total[0] = total[0] + lanes[slot // width, slot % width + f * width]
                    folded[slot // width, slot % width] = total[0]

    return fold


# --- CSR -------------------------------------------------------------------------------


def csr_matmul_func(m: int, k: int, n: int, nnz: int, index_dtype: str = "int16"):
    """A TIR PrimFunc computing ``y = x @ W`` from ``encode(W, "csr")`` on a GPU.

    Parameters, in order: ``x`` float32 [m, k], ``indptr`` int32 [n + 1], ``indices``
    ``index_dtype`` [nnz], ``values`` float32 [nnz], ``y`` float32 [m, n] (every element
    written). One warp per output row, ``CSR_WARPS`` rows per block of
    ``32 * CSR_WARPS`` threads. Global symbol
    ``cuda_csr_matmul_m{m}_k{k}_n{n}_nnz{nnz}_{index_dtype}``.

    Args:
        m: rows of ``x``, 1 to ``MAX_ROWS``.
        k: reduction size (``indices`` lie in ``[0, k)``).
        n: output size.
        nnz: stored nonzeros (may be 0).
        index_dtype: ``"int16"`` (``k <= 32768``) or ``"int32"``.

    Returns:
        A ``tvm.tirx.PrimFunc``.

    Raises:
        ValueError: for a bad size or count, an unknown index dtype or int16 indices with
            ``k > 32768``.
    """
    from tvm.script import tirx as T

    _check_rows(m)
    _check_sizes(k=k, n=n)
    _check_count("nnz", nnz)
    _check_index_dtype(index_dtype)
    if index_dtype == "int16" and k > 32768:
        raise ValueError(f"int16 indices cannot address k={k} columns")

    threads = WARP * CSR_WARPS
    items = CSR_WARPS * m  # (warp, row of x)
    width = _fold_width(WARP)
    fold = _fold_macro(threads)

    @T.prim_func
    def csr_matmul(
        x: T.Buffer((m, k), "float32"),
        indptr: T.Buffer((n + 1,), "int32"),
        indices: T.Buffer((nnz,), index_dtype),
        values: T.Buffer((nnz,), "float32"),
        y: T.Buffer((m, n), "float32"),
    ):
        T.func_attr(_func_attrs(f"cuda_csr_matmul_m{m}_k{k}_n{n}_nnz{nnz}_{index_dtype}"))
        for bx in T.thread_binding(_ceil_div(n, CSR_WARPS), thread="blockIdx.x"):
            lanes = T.alloc_buffer((items, WARP), "float32", scope="shared")
            folded = T.alloc_buffer((items, width), "float32", scope="shared")
            for t in T.thread_binding(threads, thread="threadIdx.x"):
                row = bx * CSR_WARPS + t // WARP
                lane = t % WARP
                acc = T.alloc_buffer((m,), "float32", scope="local")
                for r in range(m):
                    acc[r] = T.float32(0)
                if row < n:
                    # Lane l takes nonzeros first + l, first + l + 32, ... of the row.
                    for s in range(
                        (indptr[row + 1] - indptr[row] + WARP * SPARSE_UNROLL - 1)
                        // (WARP * SPARSE_UNROLL)
                    ):
                        for u in T.unroll(SPARSE_UNROLL):
                            j = indptr[row] + lane + (s * SPARSE_UNROLL + u) * WARP
                            if j < indptr[row + 1]:
                                for r in range(m):
                                    acc[r] = acc[r] + values[j] * x[r, T.Cast("int32", indices[j])]
                for r in range(m):
                    lanes[(t // WARP) * m + r, lane] = acc[r]
            fold(lanes, folded, items, width)
            for t in T.thread_binding(threads, thread="threadIdx.x"):
                if t < items:
                    if bx * CSR_WARPS + t // m < n:
                        total = T.alloc_buffer((1,), "float32", scope="local")
                        total[0] = T.float32(0)
                        for w in range(width):
                            total[0] = total[0] + folded[t, w]
                        y[t % m, bx * CSR_WARPS + t // m] = total[0]

    return csr_matmul


# --- BSR -------------------------------------------------------------------------------


def bsr_matmul_func(
    m: int, k: int, n: int, block: tuple[int, int], nnzb: int, index_dtype: str = "int16"
):
    """A TIR PrimFunc computing ``y = x @ W`` from ``encode(W, "bsr", block)`` on a GPU.

    Parameters, in order: ``x`` float32 [m, k], ``indptr`` int32 [ceil(n / R) + 1],
    ``indices`` ``index_dtype`` [nnzb] (block columns), ``values`` float32 [nnzb, R, C],
    ``y`` float32 [m, n] (every element written). ``k`` and ``n`` need not be multiples
    of the block. A group of ``max(BSR_GROUP, R * C)`` threads per block row (see the
    module docstring), ``max(1, BSR_THREADS // group)`` block rows per thread block. Global
    symbol ``cuda_bsr_matmul_m{m}_k{k}_n{n}_b{R}x{C}_nnzb{nnzb}_{index_dtype}``.

    Args:
        m: rows of ``x``, 1 to ``MAX_ROWS``.
        k: reduction size.
        n: output size.
        block: ``(R, C)``: rows of ``W^T`` (outputs) and columns (inputs) per block, each
            one of ``BSR_BLOCK_SIDES``.
        nnzb: stored blocks (may be 0).
        index_dtype: ``"int16"`` or ``"int32"``.

    Returns:
        A ``tvm.tirx.PrimFunc``.

    Raises:
        ValueError: for a bad size or count, an unsupported block or an unknown index
            dtype.
    """
    from tvm.script import tirx as T

    _check_rows(m)
    _check_sizes(k=k, n=n)
    _check_count("nnzb", nnzb)
    _check_index_dtype(index_dtype)
    if len(block) != 2 or any(side not in BSR_BLOCK_SIDES for side in block):
        raise ValueError(f"block sides must be in {BSR_BLOCK_SIDES}, got {block!r}")

    block_r, block_c = int(block[0]), int(block[1])
    block_size = block_r * block_c
    block_rows = _ceil_div(n, block_r)
    group = max(BSR_GROUP, block_size)  # threads per block row
    groups = max(1, BSR_THREADS // group)  # block rows per thread block
    threads = group * groups
    per_step = group // block_size  # blocks a group reads per step
    lane_count = group // block_r  # threads that share one output row r
    items = groups * m * block_r  # (block row, row of x, r)
    width = _fold_width(lane_count)
    partial_col = k % block_c != 0
    fold = _fold_macro(threads)

    @T.macro
    def accumulate(acc, x, values, b, e, col):
        for r in range(m):
            acc[r] = acc[r] + values[b, e % block_size // block_c, e % block_c] * x[r, col]

    @T.macro
    def add_lanes(y, lanes, item, ib, r_out):
        # The last phase for one (block row, row of x, r): the remaining lanes into y.
        total = T.alloc_buffer((1,), "float32", scope="local")
        total[0] = T.float32(0)
        for w in range(lanes.shape[1]):
            total[0] = total[0] + lanes[item, w]
        y[item // block_r % m, ib * block_r + r_out] = total[0]

    @T.prim_func
    def bsr_matmul(
        x: T.Buffer((m, k), "float32"),
        indptr: T.Buffer((block_rows + 1,), "int32"),
        indices: T.Buffer((nnzb,), index_dtype),
        values: T.Buffer((nnzb, block_r, block_c), "float32"),
        y: T.Buffer((m, n), "float32"),
    ):
        T.func_attr(
            _func_attrs(
                f"cuda_bsr_matmul_m{m}_k{k}_n{n}_b{block_r}x{block_c}_nnzb{nnzb}_{index_dtype}"
            )
        )
        for bx in T.thread_binding(_ceil_div(block_rows, groups), thread="blockIdx.x"):
            lanes = T.alloc_buffer((items, lane_count), "float32", scope="shared")
            folded = T.alloc_buffer((items, width), "float32", scope="shared")
            for t in T.thread_binding(threads, thread="threadIdx.x"):
                ib = bx * groups + t // group
                e = t % group  # position in the group: block slot e // (R*C), then (r, c)
                acc = T.alloc_buffer((m,), "float32", scope="local")
                for r in range(m):
                    acc[r] = T.float32(0)
                if ib < block_rows:
                    for s in range(
                        (indptr[ib + 1] - indptr[ib] + per_step * SPARSE_UNROLL - 1)
                        // (per_step * SPARSE_UNROLL)
                    ):
                        for u in T.unroll(SPARSE_UNROLL):
                            b = indptr[ib] + e // block_size + (s * SPARSE_UNROLL + u) * per_step
                            if b < indptr[ib + 1]:
                                col = T.Cast("int32", indices[b]) * block_c + e % block_c
                                if partial_col:
                                    if col < k:
                                        accumulate(acc, x, values, b, e, col)
                                else:
                                    accumulate(acc, x, values, b, e, col)
                # Output row r = e % (R*C) // C gathers the lanes (block slot, c).
                for r in range(m):
                    lanes[
                        ((t // group) * m + r) * block_r + e % block_size // block_c,
                        e // block_size * block_c + e % block_c,
                    ] = acc[r]
            if width < lane_count:
                fold(lanes, folded, items, width)
            for t in T.thread_binding(threads, thread="threadIdx.x"):
                for u in range(_ceil_div(items, threads)):
                    item = t + u * threads
                    ib = bx * groups + item // (m * block_r)
                    if item < items and ib < block_rows:
                        if ib * block_r + item % block_r < n:
                            if width < lane_count:
                                add_lanes(y, folded, item, ib, item % block_r)
                            else:
                                add_lanes(y, lanes, item, ib, item % block_r)

    return bsr_matmul


# --- Gated and dual (split-K over the active inputs) -------------------------------------


def default_k_parts(k: int, n: int) -> int:
    """Slices of K for ``gated_matmul_func`` and ``dual_matmul_func`` when none is given:
    enough that the grid has about ``GATED_TARGET_BLOCKS`` blocks, and at most one per
    ``GATED_WARPS * 8`` rows, so that each warp still walks several rows."""
    tiles = _ceil_div(n, WARP)
    return max(1, min(_ceil_div(GATED_TARGET_BLOCKS, tiles), k // (GATED_WARPS * 8)))


def _split_k_macros(m: int, k: int, n: int, per_channel: bool, k_parts: int, dual: bool):
    """The two kernels of ``gated_matmul_func`` (``dual`` False) or ``dual_matmul_func``.

    Returns ``(split_k_block, add_partials)``: ``split_k_block(x, threshold, weights,
    partials, bx, by)`` is the body of thread block ``(bx, by)`` of the first kernel, with
    ``weights`` the tuple ``(w,)`` or ``(bits, offsets, values)``: each warp walks its
    rows of slice ``by``, computes the gate and skips the inactive rows, then the warps'
    sums are reduced in shared memory into ``partials[by]``. ``add_partials(partials, y)``
    is the second kernel.
    """
    from tvm.script import tirx as T

    threads = WARP * GATED_WARPS
    items = m * WARP  # (row of x, column of the tile)
    width = _fold_width(GATED_WARPS)
    fold = _fold_macro(threads)
    k_slice = _ceil_div(k, k_parts)

    def limit(threshold, kk):
        return threshold[kk] if per_channel else threshold[0]

    @T.macro
    def gate_row(x, threshold, kk, gated, live):
        # gated[r] = gate(x)[r, kk]; live[0] = 1 when any row is active at kk.
        live[0] = 0
        for r in range(m):
            gated[r] = T.if_then_else(T.abs(x[r, kk]) > limit(threshold, kk), x[r, kk], T.float32(0))
            if T.abs(x[r, kk]) > limit(threshold, kk):
                live[0] = 1

    @T.macro
    def add_dense_row(acc, gated, w, kk, col):
        if col < n:
            for r in range(m):
                acc[r] = acc[r] + gated[r] * w[kk, col]

    @T.macro
    def add_bitmask_row(acc, gated, bits, offsets, values, kk, word_index, lane):
        word = bits[kk, word_index]
        if T.bitwise_and(T.shift_right(word, lane), T.uint32(1)) == T.uint32(1):
            # The set lanes below this one come first in values.
            below = T.bitwise_and(word, T.shift_left(T.uint32(1), lane) - T.uint32(1))
            v = values[offsets[kk, word_index] + T.Cast("int32", T.popcount(below))]
            for r in range(m):
                acc[r] = acc[r] + gated[r] * v

    @T.macro
    def split_k_block(x, threshold, weights, partials, bx, by):
        lanes = T.alloc_buffer((items, GATED_WARPS), "float32", scope="shared")
        folded = T.alloc_buffer((items, width), "float32", scope="shared")
        for t in T.thread_binding(threads, thread="threadIdx.x"):
            acc = T.alloc_buffer((m,), "float32", scope="local")
            gated = T.alloc_buffer((m,), "float32", scope="local")
            live = T.alloc_buffer((1,), "int32", scope="local")
            for r in range(m):
                acc[r] = T.float32(0)
            # Warp t // 32 takes rows t // 32, t // 32 + GATED_WARPS, ... of the slice.
            for s in range(_ceil_div(k_slice, GATED_WARPS * GATED_ROW_UNROLL)):
                for u in T.unroll(GATED_ROW_UNROLL):
                    slot = t // WARP + (s * GATED_ROW_UNROLL + u) * GATED_WARPS
                    kk = by * k_slice + slot
                    if slot < k_slice and kk < k:
                        gate_row(x, threshold, kk, gated, live)
                        if live[0] == 1:
                            if dual:
                                add_bitmask_row(
                                    acc, gated, weights[0], weights[1], weights[2], kk, bx,
                                    T.Cast("uint32", t % WARP),
                                )
                            else:
                                add_dense_row(acc, gated, weights[0], kk, bx * WARP + t % WARP)
            for r in range(m):
                lanes[r * WARP + t % WARP, t // WARP] = acc[r]
        if width < GATED_WARPS:
            fold(lanes, folded, items, width)
        for t in T.thread_binding(threads, thread="threadIdx.x"):
            for u in range(_ceil_div(items, threads)):
                item = t + u * threads
                if item < items and bx * WARP + item % WARP < n:
                    total = T.alloc_buffer((1,), "float32", scope="local")
                    total[0] = T.float32(0)
                    if width < GATED_WARPS:
                        for w in range(width):
                            total[0] = total[0] + folded[item, w]
                    else:
                        for w in range(width):
                            total[0] = total[0] + lanes[item, w]
                    partials[by, item // WARP * n + bx * WARP + item % WARP] = total[0]

    @T.macro
    def add_partials(partials, y):
        for b in T.thread_binding(_ceil_div(m * n, REDUCE_THREADS), thread="blockIdx.x"):
            for t in T.thread_binding(REDUCE_THREADS, thread="threadIdx.x"):
                if b * REDUCE_THREADS + t < m * n:
                    total = T.alloc_buffer((1,), "float32", scope="local")
                    total[0] = T.float32(0)
                    for p in range(k_parts):
                        total[0] = total[0] + partials[p, b * REDUCE_THREADS + t]
                    y[(b * REDUCE_THREADS + t) // n, (b * REDUCE_THREADS + t) % n] = total[0]

    return split_k_block, add_partials


def gated_matmul_func(m: int, k: int, n: int, per_channel: bool, k_parts: int | None = None):
    """A TIR PrimFunc computing ``y = gate(x) @ W`` for a dense row-major ``W`` on a GPU.

    Parameters, in order: ``x`` float32 [m, k], ``threshold`` float32 [k] or [1],
    ``w`` float32 [k, n], ``y`` float32 [m, n] (every element written); the gate keeps
    ``x`` where ``|x| > threshold``. Two kernels: the first has a grid of
    (``ceil(n / 32)`` column tiles, ``k_parts`` slices of ``k``) blocks of
    ``32 * GATED_WARPS`` threads and skips the rows of ``w`` whose input is inactive in
    every row of ``x``; the second adds the ``k_parts`` partial sums (a ``k_parts * m * n``
    float workspace) into ``y``. Global symbol
    ``cuda_gated_matmul_m{m}_k{k}_n{n}_{channel|scalar}``.

    Args:
        m: rows of ``x``, 1 to ``MAX_ROWS``.
        k: reduction size.
        n: output size.
        per_channel: a threshold per input channel (``[k]``) rather than one (``[1]``).
        k_parts: slices of ``k`` (split-K); ``default_k_parts(k, n)`` when None.

    Returns:
        A ``tvm.tirx.PrimFunc``.

    Raises:
        ValueError: for a bad size or ``k_parts``, or a non-bool ``per_channel``.
    """
    from tvm.script import tirx as T

    _check_rows(m)
    _check_sizes(k=k, n=n)
    k_parts = default_k_parts(k, n) if k_parts is None else k_parts
    _check_gate_args(per_channel, k_parts)

    split_k_block, add_partials = _split_k_macros(m, k, n, per_channel, k_parts, dual=False)
    threshold_size = k if per_channel else 1

    @T.prim_func
    def gated_matmul(
        x: T.Buffer((m, k), "float32"),
        threshold: T.Buffer((threshold_size,), "float32"),
        w: T.Buffer((k, n), "float32"),
        y: T.Buffer((m, n), "float32"),
    ):
        T.func_attr(
            _func_attrs(f"cuda_gated_matmul_m{m}_k{k}_n{n}_{'channel' if per_channel else 'scalar'}")
        )
        partials = T.alloc_buffer((k_parts, m * n), "float32")
        for bx in T.thread_binding(_ceil_div(n, WARP), thread="blockIdx.x"):
            for by in T.thread_binding(k_parts, thread="blockIdx.y"):
                split_k_block(x, threshold, (w,), partials, bx, by)
        add_partials(partials, y)

    return gated_matmul


def pack_dual_weight(weight: np.ndarray) -> list[np.ndarray]:
    """Packs a ``[K, N]`` weight for ``dual_matmul_func``: a bitmask per 32-column word.

    Args:
        weight: the ``[K, N]`` float32 weight (``y = x @ weight``).

    Returns:
        ``[bits uint32 [K, ceil(N / 32)], offsets int32 [K, ceil(N / 32)], values float32
        [nnz]]``: bit ``l`` of ``bits[k, j]`` is set when ``weight[k, 32 j + l]`` is
        nonzero, ``values`` are the nonzeros in row-major order and ``offsets[k, j]`` is
        where those of word ``(k, j)`` start.

    Raises:
        ValueError: if ``weight`` is not a 2-D float32 array.
    """
    if weight.ndim != 2 or weight.dtype != np.float32:
        raise ValueError(f"expected a 2-D float32 weight, got {weight.ndim}-D {weight.dtype}")
    k, n = weight.shape
    words = _ceil_div(n, WARP)
    mask = np.zeros((k, words * WARP), dtype=bool)
    mask[:, :n] = weight != 0
    lanes = mask.reshape(k, words, WARP)
    bits = (lanes.astype(np.uint64) << np.arange(WARP, dtype=np.uint64)).sum(axis=2)
    counts = lanes.sum(axis=2).reshape(-1)
    offsets = np.zeros(k * words, dtype=np.int64)
    np.cumsum(counts[:-1], out=offsets[1:])
    return [
        bits.astype(np.uint32),
        offsets.reshape(k, words).astype(np.int32),
        np.ascontiguousarray(weight[weight != 0]),
    ]


def unpack_dual_weight(arrays: list[np.ndarray], k: int, n: int) -> np.ndarray:
    """Rebuilds the dense ``[k, n]`` weight from ``pack_dual_weight``'s arrays."""
    bits, _, values = arrays
    words = bits.shape[1]
    mask = ((bits[:, :, None].astype(np.uint64) >> np.arange(WARP, dtype=np.uint64)) & 1).astype(bool)
    mask = mask.reshape(k, words * WARP)[:, :n]
    weight = np.zeros((k, n), dtype=values.dtype)
    weight[mask] = values
    return weight


def dual_matmul_func(
    m: int, k: int, n: int, nnz: int, per_channel: bool, k_parts: int | None = None
):
    """A TIR PrimFunc computing ``y = gate(x) @ W`` for a sparse ``W`` from ``pack_dual_weight``.

    Parameters, in order: ``x`` float32 [m, k], ``threshold`` float32 [k] or [1],
    ``bits`` uint32 [k, ceil(n / 32)], ``offsets`` int32 [k, ceil(n / 32)], ``values``
    float32 [nnz], ``y`` float32 [m, n] (every element written). The grid, gate and
    split-K are ``gated_matmul_func``'s; an active row reads its word's bits and offset
    (one broadcast load each per warp) and lane ``l`` its value when bit ``l`` is set.
    Global symbol ``cuda_dual_matmul_m{m}_k{k}_n{n}_nnz{nnz}_{channel|scalar}``.

    Args:
        m: rows of ``x``, 1 to ``MAX_ROWS``.
        k: reduction size.
        n: output size.
        nnz: stored nonzeros (may be 0).
        per_channel: a threshold per input channel (``[k]``) rather than one (``[1]``).
        k_parts: slices of ``k`` (split-K); ``default_k_parts(k, n)`` when None.

    Returns:
        A ``tvm.tirx.PrimFunc``.

    Raises:
        ValueError: for a bad size, count or ``k_parts``, or a non-bool ``per_channel``.
    """
    from tvm.script import tirx as T

    _check_rows(m)
    _check_sizes(k=k, n=n)
    _check_count("nnz", nnz)
    k_parts = default_k_parts(k, n) if k_parts is None else k_parts
    _check_gate_args(per_channel, k_parts)

    split_k_block, add_partials = _split_k_macros(m, k, n, per_channel, k_parts, dual=True)
    words = _ceil_div(n, WARP)
    threshold_size = k if per_channel else 1

    @T.prim_func
    def dual_matmul(
        x: T.Buffer((m, k), "float32"),
        threshold: T.Buffer((threshold_size,), "float32"),
        bits: T.Buffer((k, words), "uint32"),
        offsets: T.Buffer((k, words), "int32"),
        values: T.Buffer((nnz,), "float32"),
        y: T.Buffer((m, n), "float32"),
    ):
        T.func_attr(
            _func_attrs(
                f"cuda_dual_matmul_m{m}_k{k}_n{n}_nnz{nnz}_{'channel' if per_channel else 'scalar'}"
            )
        )
        partials = T.alloc_buffer((k_parts, m * n), "float32")
        for bx in T.thread_binding(words, thread="blockIdx.x"):
            for by in T.thread_binding(k_parts, thread="blockIdx.y"):
                split_k_block(x, threshold, (bits, offsets, values), partials, bx, by)
        add_partials(partials, y)

    return dual_matmul


# --- Checking on the CPU ----------------------------------------------------------------


def serial_copy(func):
    """The same PrimFunc with every thread-bound loop made a serial loop.

    The kernels in this module run their phases as consecutive thread-bound loops with
    shared memory between them (see the module docstring), so the serial copy computes
    what the GPU does, and it can be built for the host with LLVM (``"shared"`` and
    ``"local"`` buffers become ordinary allocations there) and compared with numpy.

    Args:
        func: a ``tvm.tirx.PrimFunc`` from this module.

    Returns:
        A ``tvm.tirx.PrimFunc`` with no thread bindings and the same global symbol.
    """
    return func.with_body(_serial_stmt(func.body))


def _serial_stmt(stmt):
    """``stmt`` rebuilt with its thread-bound loops serial (TVM 0.27's Python API has no
    generic statement mutator, so the few statement kinds with bodies are walked here)."""
    from tvm import tirx

    if isinstance(stmt, tirx.SeqStmt):
        return tirx.SeqStmt([_serial_stmt(s) for s in stmt.seq])
    if isinstance(stmt, tirx.For):
        kind = tirx.ForKind.SERIAL if stmt.kind == tirx.ForKind.THREAD_BINDING else stmt.kind
        binding = None if kind != stmt.kind else stmt.thread_binding
        return tirx.For(
            stmt.loop_var, stmt.min, stmt.extent, kind, _serial_stmt(stmt.body), binding,
            stmt.annotations, stmt.step,
        )
    if isinstance(stmt, tirx.IfThenElse):
        else_case = None if stmt.else_case is None else _serial_stmt(stmt.else_case)
        return tirx.IfThenElse(stmt.condition, _serial_stmt(stmt.then_case), else_case)
    if isinstance(stmt, tirx.AttrStmt):
        return tirx.AttrStmt(stmt.node, stmt.attr_key, stmt.value, _serial_stmt(stmt.body))
    if isinstance(stmt, tirx.While):
        return tirx.While(stmt.condition, _serial_stmt(stmt.body))
    return stmt  # no nested statements
