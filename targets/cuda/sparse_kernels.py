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
  stored values are the zero padding). CSR is this kernel's loop with ``1 x 1`` blocks
  and a warp per row.

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


Each kernel is a small body per format inside one of the two loop skeletons of
``targets.cuda.skeletons`` (csr and bsr: parallel over output rows; gated and dual:
split-K over the active inputs). ``KERNELS`` is the table of them by weight format,
which ``targets.tvm_import`` reads to call them from a legalized model.
"""

from __future__ import annotations

import numpy as np

import formats
from targets.cuda.skeletons import (
    GATED_WARPS, MAX_ROWS, REDUCE_THREADS, WARP, ceil_div, check_rows, default_k_parts, parallel_rows, split_k,
)
from targets.kernel_args import (
    bsr_kernel, check_bsr, check_count, check_csr, check_gate, check_sizes, csr_kernel,
    func_attrs, gated_kernel, kernel_table,
)

__all__ = ["MAX_ROWS", "GATED_WARPS", "REDUCE_THREADS", "KERNELS", "csr_matmul_func", "bsr_matmul_func",
           "gated_matmul_func", "dual_matmul_func", "pack_dual_weight", "unpack_dual_weight", "default_k_parts",
           "serial_copy"]

#: Output rows (one warp each) per thread block of the CSR kernel.
CSR_WARPS = 4
#: Threads per block row of the BSR kernel (at least ``R * C``): there are ``R`` times
#: fewer block rows than rows, so several warps per block row keep enough loads in flight.
BSR_GROUP = 128
#: Threads per thread block the BSR kernel aims at.
BSR_THREADS = 128


# --- CSR -------------------------------------------------------------------------------


def csr_matmul_func(m: int, k: int, n: int, nnz: int, index_dtype: str = "int16"):
    """A TIR PrimFunc computing ``y = x @ W`` from ``encode(W, "csr")`` on a GPU.

    Operands, arguments and errors are those of ``targets.cpu.sparse_kernels.csr_matmul_func``,
    with ``m`` at most ``MAX_ROWS``. One warp per output row, ``CSR_WARPS`` rows per block
    of ``32 * CSR_WARPS`` threads. Global symbol
    ``cuda_csr_matmul_m{m}_k{k}_n{n}_nnz{nnz}_{index_dtype}``.
    """
    from tvm.script import tirx as T

    check_rows(m)
    check_csr(k, n, nnz, index_dtype)

    @T.macro
    def accumulate(acc, x, weights, j, lane):
        # Lane l takes nonzeros first + l, first + l + 32, ... of the row.
        indptr, indices, values = weights
        for r in range(m):
            acc[r] = acc[r] + values[j] * x[r, T.Cast("int32", indices[j])]

    over_rows = parallel_rows(m, n, (1, 1), WARP, CSR_WARPS, accumulate)

    return csr_kernel(m, k, n, nnz, index_dtype, formats.symbol("csr", "cuda", "matmul", m, k, n, nnz=nnz, index_dtype=index_dtype), over_rows)


# --- BSR -------------------------------------------------------------------------------


def bsr_matmul_func(
    m: int, k: int, n: int, block: tuple[int, int], nnzb: int, index_dtype: str = "int16"
):
    """A TIR PrimFunc computing ``y = x @ W`` from ``encode(W, "bsr", block)`` on a GPU.

    Operands, arguments and errors are those of ``targets.cpu.sparse_kernels.bsr_matmul_func``,
    with ``m`` at most ``MAX_ROWS``; ``k`` and ``n`` need not be multiples of the block. A
    group of ``max(BSR_GROUP, R * C)`` threads per block row (see the module docstring),
    ``max(1, BSR_THREADS // group)`` block rows per thread block. Global symbol
    ``cuda_bsr_matmul_m{m}_k{k}_n{n}_b{R}x{C}_nnzb{nnzb}_{index_dtype}``.
    """
    from tvm.script import tirx as T

    check_rows(m)
    check_bsr(k, n, block, nnzb, index_dtype)

    block_r, block_c = int(block[0]), int(block[1])
    block_size = block_r * block_c
    group = max(BSR_GROUP, block_size)  # threads per block row
    partial_col = k % block_c != 0

    @T.macro
    def add_block_value(acc, x, values, b, e, col):
        for r in range(m):
            acc[r] = acc[r] + values[b, e % block_size // block_c, e % block_c] * x[r, col]

    @T.macro
    def accumulate(acc, x, weights, b, e):
        indptr, indices, values = weights
        col = T.Cast("int32", indices[b]) * block_c + e % block_c
        if partial_col:
            if col < k:
                add_block_value(acc, x, values, b, e, col)
        else:
            add_block_value(acc, x, values, b, e, col)

    over_rows = parallel_rows(m, n, (block_r, block_c), group, max(1, BSR_THREADS // group), accumulate)
    symbol = formats.symbol("bsr", "cuda", "matmul", m, k, n, nnz=nnzb, block=(block_r, block_c), index_dtype=index_dtype)
    return bsr_kernel(m, k, n, (block_r, block_c), nnzb, index_dtype, symbol, over_rows)


# --- Gated and dual (split-K over the active inputs) -------------------------------------


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

    check_rows(m)
    check_sizes(k=k, n=n)
    k_parts = default_k_parts(k, n) if k_parts is None else k_parts
    check_gate(per_channel, k_parts)

    @T.macro
    def add_dense_row(acc, gated, weights, kk, bx, lane):
        (w,) = weights
        if bx * WARP + lane < n:
            for r in range(m):
                acc[r] = acc[r] + gated[r] * w[kk, bx * WARP + lane]

    matmul = split_k(m, k, n, per_channel, k_parts, add_dense_row)
    return gated_kernel(m, k, n, per_channel, formats.symbol("dense", "cuda", "gated", m, k, n, per_channel=per_channel), matmul)


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
    return formats.get("bitmask_words").encode(weight)


def unpack_dual_weight(arrays: list[np.ndarray], k: int, n: int) -> np.ndarray:
    """Rebuilds the dense ``[k, n]`` weight from ``pack_dual_weight``'s arrays."""
    return formats.get("bitmask_words").decode(arrays, (k, n))


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

    check_rows(m)
    check_sizes(k=k, n=n)
    check_count("nnz", nnz)
    k_parts = default_k_parts(k, n) if k_parts is None else k_parts
    check_gate(per_channel, k_parts)
    words = ceil_div(n, WARP)
    threshold_size = k if per_channel else 1

    @T.macro
    def add_bitmask_row(acc, gated, weights, kk, word_index, lane):
        bits, offsets, values = weights
        word = bits[kk, word_index]
        if T.bitwise_and(T.shift_right(word, T.Cast("uint32", lane)), T.uint32(1)) == T.uint32(1):
            # The set lanes below this one come first in values.
            below = T.bitwise_and(word, T.shift_left(T.uint32(1), T.Cast("uint32", lane)) - T.uint32(1))
            v = values[offsets[kk, word_index] + T.Cast("int32", T.popcount(below))]
            for r in range(m):
                acc[r] = acc[r] + gated[r] * v

    matmul = split_k(m, k, n, per_channel, k_parts, add_bitmask_row)

    @T.prim_func
    def dual_matmul(
        x: T.Buffer((m, k), "float32"),
        threshold: T.Buffer((threshold_size,), "float32"),
        bits: T.Buffer((k, words), "uint32"),
        offsets: T.Buffer((k, words), "int32"),
        values: T.Buffer((nnz,), "float32"),
        y: T.Buffer((m, n), "float32"),
    ):
        T.func_attr(func_attrs(formats.symbol("bitmask_words", "cuda", "gated", m, k, n, nnz=nnz, per_channel=per_channel)))
        matmul(x, threshold, (bits, offsets, values), y)

    return dual_matmul


#: The CUDA kernels by weight format (``targets.cpu.sparse_kernels.KERNELS`` says how the
#: table is read); bitmask and segments have no CUDA kernel, so legalisation re-encodes
#: such weights (``targets.cuda.legalize``).
KERNELS = kernel_table(csr=csr_matmul_func, bsr=bsr_matmul_func, gated=gated_matmul_func, dual=dual_matmul_func)


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
