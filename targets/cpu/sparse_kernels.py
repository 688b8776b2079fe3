"""Sparse fp32 matmul kernels for the CPU, written directly in low-level TIR.

Every kernel computes ``y[M, N] = x[M, K] @ W[K, N]`` (or ``gate(x) @ W``; the two
gathers at the end read rows of ``W^T`` instead, for the embedding lookup of a tied output
projection) and is specialised to one shape from Python, like
``targets.cpu.kernels.dense_matmul_func``. At decode (``M = 1``) a matmul reads each
weight once and is bound by DRAM bandwidth, so a kernel is as fast as the bytes it reads
are few; each one below walks its weight arrays in storage order (a sequential stream per
core, prefetched ``PREFETCH_BYTES`` ahead) and keeps ``x`` and its accumulators in L1 and
registers. Rows of ``x`` are handled in tiles of up to ``SPARSE_ROW_TILE``, so one pass
over the weights serves a whole tile.

Weight formats (``passes.sparse_formats`` documents their byte costs):

``csr`` -- ``encode(W, "csr")``. ``W^T`` ([N, K]) stored by output row::

    y[m, i] = sum_{j in [indptr[i], indptr[i+1])} values[j] * x[m, indices[j]]

  ``indptr`` int32 [N + 1], ``indices`` int16 or int32 [nnz] (the ``k`` of each nonzero),
  ``values`` float32 [nnz]. Sixteen nonzeros at a time: one vector of values times an
  AVX-512 gather of ``x`` at their indices.

``bsr`` -- ``encode(W, "bsr", (R, C))``. ``W^T`` zero-padded to whole ``R x C`` blocks, by
block row::

    y[m, ib*R + r] = sum_{b in [indptr[ib], indptr[ib+1])} sum_c
                         values[b, r, c] * x[m, indices[b]*C + c]

  ``indptr`` int32 [ceil(N / R) + 1], ``indices`` int16 or int32 [nnzb] (block column),
  ``values`` float32 [nnzb, R, C]. Padding rows are never written and padding columns of
  ``x`` never read.

``bitmask`` -- ``encode(W, "bitmask")``. ``W^T`` by output row; bit ``b`` of byte ``j`` of
row ``i`` says whether ``W^T[i, 8j + b]`` is nonzero, and the nonzeros follow in row-major
order::

    y[m, i] = sum_k bit(i, k) * values[row_offsets[i] + rank(i, k)] * x[m, k]

  ``bits`` uint8 [N, ceil(K / 8)], ``row_offsets`` int32 [N + 1], ``values`` float32 [nnz].
  Sixteen ``k`` at a time: the 16 bits are an AVX-512 lane mask, ``vexpandps`` scatters the
  next ``popcount`` values into their lanes, and one FMA with ``x[m, k:k+16]`` follows.

``gated`` (activation sparsity, dense weight) -- ``y = gate(x) @ W`` with
``gate(x)[m, k] = x[m, k] if |x[m, k]| > t else 0`` and ``t`` a float32 threshold of shape
[1] or [K] (per input channel). ``W`` is the plain row-major [K, N] weight, so an inactive
input ``k`` (zero after the gate in every row of ``x``) skips one contiguous row of ``W``.
The active inputs are listed first; ``k_parts`` parallel tasks take equal slices of the
list and each accumulates its rows of ``W``, two at a time, into a partial ``y`` in a
workspace; a second parallel loop sums the partials into ``y``.

``dual`` (activation sparsity and sparse weight) -- the same split over ``K`` as
``gated``, with each row of ``W`` ([K, N], by input) stored as a bitmask over ``N``:
``pack_dual_weight(W) = encode(W.T, "bitmask")``, that is ``bits`` uint8 [K, ceil(N / 8)],
``row_offsets`` int32 [K + 1], ``values`` float32 [nnz]. An inactive input skips its row;
an active one reads only its row's bits and nonzero values, expanded sixteen columns at a
time into the partial ``y``.

``segments`` (activation sparsity, block-pruned weight) -- the split over ``K`` of
``dual``, with each row of ``W`` stored as windows of 16 consecutive columns that hold all
its nonzeros (``pack_segment_weight``); an active input adds only its windows.

Each kernel is a small body per format inside one of the loop skeletons of
``targets.cpu.skeletons`` (csr, bsr and bitmask run in parallel over output rows; gated,
dual and segments split K over the active inputs), with the vector steps from
``targets.cpu.simd``. ``KERNELS`` is the table of them by weight format, which
``targets.tvm_import`` reads to call them from a legalized model.
"""

from __future__ import annotations

import numpy as np

import formats
from targets.cpu.simd import (
    LANES, PREFETCH_BYTES, all_lanes, bit_chunk, bit_lanes, expand, gather, lane_sum_macro, lanes_below,
    masked_load, prefetch,
)
from targets.cpu.skeletons import (
    GATED_K_PARTS, SPARSE_ROW_TILE, gate_tile_macro, pairs_of_rows, parallel_rows, single_rows, split_k,
)
from targets.kernel_args import (
    bsr_kernel, check_bsr, check_count, check_csr, check_gate, check_gather, check_index_dtype, check_sizes,
    csr_kernel, func_attrs, gated_kernel, kernel_table,
)

#: Rows of ``x`` per pass in the bitmask kernel, which keeps four accumulator chains per
#: row (its per-chunk work is short enough that one FMA chain's latency would bound it).
BITMASK_ROW_TILE = 4
#: Floats per accumulator buffer in the BSR kernel (512 bytes; see ``SPARSE_ROW_TILE``).
BSR_ACC_FLOATS = 128


# --- CSR -------------------------------------------------------------------------------


def csr_matmul_func(m: int, k: int, n: int, nnz: int, index_dtype: str = "int16"):
    """A TIR PrimFunc computing ``y = x @ W`` from ``encode(W, "csr")``.

    Parameters, in order: ``x`` float32 [m, k], ``indptr`` int32 [n + 1], ``indices``
    ``index_dtype`` [nnz], ``values`` float32 [nnz], ``y`` float32 [m, n] (every element
    written). Parallel over output rows. Global symbol
    ``csr_matmul_m{m}_k{k}_n{n}_nnz{nnz}_{index_dtype}``.

    Args:
        m: rows of ``x``; any positive value.
        k: reduction size (``indices`` lie in ``[0, k)``).
        n: output size.
        nnz: stored nonzeros (may be 0).
        index_dtype: ``"int16"`` (``k < 32768``) or ``"int32"``.

    Returns:
        A ``tvm.tirx.PrimFunc``.

    Raises:
        ValueError: for a non-positive size, a negative ``nnz``, an unknown index dtype or
            int16 indices with ``k > 32768``.
    """
    from tvm.script import tirx as T

    check_sizes(m=m)
    check_csr(k, n, nnz, index_dtype)

    lane_sum = lane_sum_macro()
    prefetch_values = PREFETCH_BYTES // 4
    prefetch_indices = PREFETCH_BYTES // np.dtype(index_dtype).itemsize

    @T.macro
    def row_tile(x, weights, y, i, m0, tile_rows):
        indptr, indices, values = weights
        # span: the row's first nonzero, its whole vectors of 16, and the start and length
        # of its last partial vector.
        span = T.alloc_buffer((4,), "int32")
        span[0] = indptr[i]
        span[1] = (indptr[i + 1] - indptr[i]) // LANES
        span[2] = indptr[i] + span[1] * LANES
        span[3] = indptr[i + 1] - span[2]
        acc = T.alloc_buffer((tile_rows * LANES,), "float32")
        for t in T.vectorized(tile_rows * LANES):
            acc[t] = T.float32(0)
        for c in range(span[1]):
            T.evaluate(prefetch(T.address_of(values[span[0] + c * LANES + prefetch_values])))
            T.evaluate(prefetch(T.address_of(indices[span[0] + c * LANES + prefetch_indices])))
            for r in T.unroll(tile_rows):
                acc[T.Ramp(r * LANES, 1, LANES)] = acc[T.Ramp(r * LANES, 1, LANES)] + values[
                    T.Ramp(span[0] + c * LANES, 1, LANES)
                ] * gather(
                    T.address_of(x[m0 + r, 0]),
                    T.Cast(f"int32x{LANES}", indices[T.Ramp(span[0] + c * LANES, 1, LANES)]),
                    all_lanes(),
                )
        # The partial vector: masked loads and gather, which read nothing past the row
        # (nor past the end of the arrays).
        if span[3] > 0:
            for r in T.unroll(tile_rows):
                acc[T.Ramp(r * LANES, 1, LANES)] = acc[T.Ramp(r * LANES, 1, LANES)] + masked_load(
                    "float32", T.address_of(values[span[2]]), lanes_below(span[3])
                ) * gather(
                    T.address_of(x[m0 + r, 0]),
                    T.Cast(
                        f"int32x{LANES}",
                        masked_load(
                            index_dtype, T.address_of(indices[span[2]]), lanes_below(span[3])
                        ),
                    ),
                    lanes_below(span[3]),
                )
        for r in T.unroll(tile_rows):
            lane_sum(acc, r * LANES, LANES)
            y[m0 + r, i] = acc[r * LANES]

    over_rows = parallel_rows(m, n, SPARSE_ROW_TILE, row_tile)
    return csr_kernel(m, k, n, nnz, index_dtype, formats.symbol("csr", "cpu", "matmul", m, k, n, nnz=nnz, index_dtype=index_dtype), over_rows)


# --- BSR -------------------------------------------------------------------------------


def bsr_matmul_func(
    m: int, k: int, n: int, block: tuple[int, int], nnzb: int, index_dtype: str = "int16"
):
    """A TIR PrimFunc computing ``y = x @ W`` from ``encode(W, "bsr", block)``.

    Parameters, in order: ``x`` float32 [m, k], ``indptr`` int32 [ceil(n / R) + 1],
    ``indices`` ``index_dtype`` [nnzb] (block columns), ``values`` float32 [nnzb, R, C],
    ``y`` float32 [m, n] (every element written). Parallel over block rows. ``k`` and ``n``
    need not be multiples of the block: the rows of the last block row past ``n`` are not
    stored, and a block in the last, partial block column reads only the ``x`` below
    ``k``. Global symbol ``bsr_matmul_m{m}_k{k}_n{n}_b{R}x{C}_nnzb{nnzb}_{index_dtype}``.

    A block with ``C = 1`` is one FMA over its ``R`` outputs with a broadcast ``x[m, k]``;
    a wider block is ``R`` FMAs of ``C`` lanes, each with a contiguous slice of ``x``, and
    the lanes are summed once per block row. Blocks of more than ``BSR_ACC_FLOATS``
    values (16x16) are walked in passes over groups of their rows, so the accumulators of
    one pass stay within a stack buffer.

    Args:
        m: rows of ``x``; any positive value.
        k: reduction size.
        n: output size.
        block: ``(R, C)``: rows of ``W^T`` (outputs) and columns (inputs) per block, each
            one of ``targets.kernel_args.BSR_BLOCK_SIDES``.
        nnzb: stored blocks (may be 0).
        index_dtype: ``"int16"`` or ``"int32"``.

    Returns:
        A ``tvm.tirx.PrimFunc``.

    Raises:
        ValueError: for a non-positive size, a negative ``nnzb``, an unsupported block or
            an unknown index dtype.
    """
    from tvm.script import tirx as T

    check_sizes(m=m)
    check_bsr(k, n, block, nnzb, index_dtype)

    block_r, block_c = int(block[0]), int(block[1])
    block_rows = -(-n // block_r)
    block_cols = -(-k // block_c)
    # Rows of a block per pass and rows of x per tile, so that the accumulators of a pass,
    # tile_rows * pass_rows * block_c floats, fit in BSR_ACC_FLOATS.
    pass_rows = min(block_r, BSR_ACC_FLOATS // block_c)
    passes = block_r // pass_rows
    tile = min(SPARSE_ROW_TILE, BSR_ACC_FLOATS // (pass_rows * block_c))
    partial_col = k % block_c != 0
    partial_row = n % block_r != 0
    block_floats = block_r * block_c
    prefetch_blocks = max(1, PREFETCH_BYTES // (block_floats * 4))
    lines_per_block = max(1, block_floats // LANES)
    lane_sum = lane_sum_macro()

    @T.macro
    def accumulate_block(acc, x, values, b, col, m0, tile_rows, p):
        if block_c == 1:
            # One k per block: R outputs times a broadcast x.
            for r in T.unroll(tile_rows):
                for t in T.vectorized(pass_rows):
                    acc[r * pass_rows + t] = (
                        acc[r * pass_rows + t] + values[b, p * pass_rows + t, 0] * x[m0 + r, col]
                    )
        else:
            for r in T.unroll(tile_rows):
                for q in T.unroll(pass_rows):
                    for c in T.vectorized(block_c):
                        acc[(r * pass_rows + q) * block_c + c] = (
                            acc[(r * pass_rows + q) * block_c + c]
                            + values[b, p * pass_rows + q, c] * x[m0 + r, col * block_c + c]
                        )

    @T.macro
    def accumulate_partial_block(acc, x, values, b, col, m0, tile_rows, p):
        # The last block column when k % C != 0: only the columns below k exist in x.
        for r in T.unroll(tile_rows):
            for q in T.unroll(pass_rows):
                for c in range(k - (block_cols - 1) * block_c):
                    acc[(r * pass_rows + q) * block_c + c] = (
                        acc[(r * pass_rows + q) * block_c + c]
                        + values[b, p * pass_rows + q, c] * x[m0 + r, col * block_c + c]
                    )

    @T.macro
    def store(acc, y, ib, m0, tile_rows, p):
        if block_c == 1:
            for r in T.unroll(tile_rows):
                for q in range(pass_rows):
                    if not partial_row:
                        y[m0 + r, ib * block_r + p * pass_rows + q] = acc[r * pass_rows + q]
                    else:
                        if ib * block_r + p * pass_rows + q < n:
                            y[m0 + r, ib * block_r + p * pass_rows + q] = acc[r * pass_rows + q]
        else:
            for r in T.unroll(tile_rows):
                for q in T.unroll(pass_rows):
                    lane_sum(acc, (r * pass_rows + q) * block_c, block_c)
                    if not partial_row:
                        y[m0 + r, ib * block_r + p * pass_rows + q] = acc[
                            (r * pass_rows + q) * block_c
                        ]
                    else:
                        if ib * block_r + p * pass_rows + q < n:
                            y[m0 + r, ib * block_r + p * pass_rows + q] = acc[
                                (r * pass_rows + q) * block_c
                            ]

    @T.macro
    def row_tile(x, weights, y, ib, m0, tile_rows):
        indptr, indices, values = weights
        for p in range(passes):
            acc = T.alloc_buffer((tile_rows * pass_rows * block_c,), "float32")
            for t in T.vectorized(tile_rows * pass_rows * block_c):
                acc[t] = T.float32(0)
            for b in range(indptr[ib], indptr[ib + 1]):
                for line in T.unroll(lines_per_block):
                    T.evaluate(
                        prefetch(
                            T.address_of(
                                values[
                                    b + prefetch_blocks,
                                    line * LANES // block_c,
                                    line * LANES % block_c,
                                ]
                            )
                        )
                    )
                T.evaluate(prefetch(T.address_of(indices[b + prefetch_blocks])))
                if not partial_col:
                    accumulate_block(
                        acc, x, values, b, T.Cast("int32", indices[b]), m0, tile_rows, p
                    )
                else:
                    if T.Cast("int32", indices[b]) < block_cols - 1:
                        accumulate_block(
                            acc, x, values, b, T.Cast("int32", indices[b]), m0, tile_rows, p
                        )
                    else:
                        accumulate_partial_block(
                            acc, x, values, b, T.Cast("int32", indices[b]), m0, tile_rows, p
                        )
            store(acc, y, ib, m0, tile_rows, p)

    over_rows = parallel_rows(m, block_rows, tile, row_tile)
    symbol = formats.symbol("bsr", "cpu", "matmul", m, k, n, nnz=nnzb, block=(block_r, block_c), index_dtype=index_dtype)
    return bsr_kernel(m, k, n, (block_r, block_c), nnzb, index_dtype, symbol, over_rows)


# --- Bitmask ---------------------------------------------------------------------------


def bitmask_matmul_func(m: int, k: int, n: int, nnz: int):
    """A TIR PrimFunc computing ``y = x @ W`` from ``encode(W, "bitmask")``.

    Parameters, in order: ``x`` float32 [m, k], ``bits`` uint8 [n, ceil(k / 8)],
    ``row_offsets`` int32 [n + 1], ``values`` float32 [nnz], ``y`` float32 [m, n] (every
    element written). Parallel over output rows. Per 16 columns of a row: the 16 bits
    become a lane mask, ``vexpandps`` loads the next ``popcount`` values into the set lanes
    and an FMA with ``x`` follows, on four accumulators in turn, so the row's
    running value offset (a popcount and an add) is the only serial dependency. The last
    ``k % 16`` columns load ``x`` under the same mask, so nothing past ``k`` is read.
    Global symbol ``bitmask_matmul_m{m}_k{k}_n{n}_nnz{nnz}``.

    The work per 16 columns is fixed whatever their nonzeros, so at high sparsity the
    kernel stops being bound by memory (measured: about 4.5x dense at 90 % for 2048x5632,
    where CSR, which reads a little more, reaches 6x); and each output row reads all of
    ``x`` again, from L2 once ``m * k`` floats outgrow L1, which makes batch 8 about as
    slow as the dense kernel.

    Args:
        m: rows of ``x``; any positive value.
        k: reduction size.
        n: output size.
        nnz: stored nonzeros (may be 0).

    Returns:
        A ``tvm.tirx.PrimFunc``.

    Raises:
        ValueError: for a non-positive size or a negative ``nnz``.
    """
    from tvm.script import tirx as T

    check_sizes(m=m, k=k, n=n)
    check_count("nnz", nnz)

    row_bytes = -(-k // 8)
    chunks = k // LANES
    quads = chunks // 4
    left = chunks % 4
    tail = k % LANES
    tail_bytes = -(-tail // 8)
    prefetch_values = PREFETCH_BYTES // 4
    lane_sum = lane_sum_macro()

    @T.macro
    def chunk(acc, weight, x, bits, values, offset, i, c, m0, tile_rows):
        weight[T.Ramp(0, 1, LANES)] = expand(
            T.address_of(values[offset[0]]), bit_chunk(bits, i, c, 2)
        )
        for r in T.unroll(tile_rows):
            acc[T.Ramp(r * LANES, 1, LANES)] = (
                acc[T.Ramp(r * LANES, 1, LANES)]
                + weight[T.Ramp(0, 1, LANES)] * x[m0 + r, T.Ramp(c * LANES, 1, LANES)]
            )
        offset[0] = offset[0] + T.Cast("int64", T.popcount(bit_chunk(bits, i, c, 2)))

    @T.macro
    def row_tile(x, weights, y, i, m0, tile_rows):
        bits, row_offsets, values = weights
        # Chunk c accumulates into acc[c % 4]: four FMA chains, as one chunk's other work
        # (a mask, an expand, a popcount) takes about a cycle, a quarter of an FMA latency.
        acc0 = T.alloc_buffer((tile_rows * LANES,), "float32")
        acc1 = T.alloc_buffer((tile_rows * LANES,), "float32")
        acc2 = T.alloc_buffer((tile_rows * LANES,), "float32")
        acc3 = T.alloc_buffer((tile_rows * LANES,), "float32")
        weight = T.alloc_buffer((LANES,), "float32")
        # int64, so that addressing `values` needs no sign extension per chunk.
        offset = T.alloc_buffer((1,), "int64")
        for t in T.vectorized(tile_rows * LANES):
            acc0[t] = T.float32(0)
            acc1[t] = T.float32(0)
            acc2[t] = T.float32(0)
            acc3[t] = T.float32(0)
        offset[0] = T.Cast("int64", row_offsets[i])
        for c4 in range(quads):
            T.evaluate(prefetch(T.address_of(values[offset[0] + prefetch_values])))
            T.evaluate(prefetch(T.address_of(bits[i, c4 * 8 + PREFETCH_BYTES])))
            chunk(acc0, weight, x, bits, values, offset, i, c4 * 4, m0, tile_rows)
            chunk(acc1, weight, x, bits, values, offset, i, c4 * 4 + 1, m0, tile_rows)
            chunk(acc2, weight, x, bits, values, offset, i, c4 * 4 + 2, m0, tile_rows)
            chunk(acc3, weight, x, bits, values, offset, i, c4 * 4 + 3, m0, tile_rows)
        if left >= 1:
            chunk(acc0, weight, x, bits, values, offset, i, quads * 4, m0, tile_rows)
        if left >= 2:
            chunk(acc1, weight, x, bits, values, offset, i, quads * 4 + 1, m0, tile_rows)
        if left >= 3:
            chunk(acc2, weight, x, bits, values, offset, i, quads * 4 + 2, m0, tile_rows)
        if tail > 0:
            weight[T.Ramp(0, 1, LANES)] = expand(
                T.address_of(values[offset[0]]), bit_chunk(bits, i, chunks, tail_bytes)
            )
            for r in T.unroll(tile_rows):
                acc3[T.Ramp(r * LANES, 1, LANES)] = acc3[
                    T.Ramp(r * LANES, 1, LANES)
                ] + weight[T.Ramp(0, 1, LANES)] * masked_load(
                    "float32",
                    T.address_of(x[m0 + r, chunks * LANES]),
                    bit_lanes(bit_chunk(bits, i, chunks, tail_bytes)),
                )
        for r in T.unroll(tile_rows):
            for t in T.vectorized(LANES):
                acc0[r * LANES + t] = (acc0[r * LANES + t] + acc1[r * LANES + t]) + (
                    acc2[r * LANES + t] + acc3[r * LANES + t]
                )
            lane_sum(acc0, r * LANES, LANES)
            y[m0 + r, i] = acc0[r * LANES]

    over_rows = parallel_rows(m, n, BITMASK_ROW_TILE, row_tile)

    @T.prim_func
    def bitmask_matmul(
        x: T.Buffer((m, k), "float32"),
        bits: T.Buffer((n, row_bytes), "uint8"),
        row_offsets: T.Buffer((n + 1,), "int32"),
        values: T.Buffer((nnz,), "float32"),
        y: T.Buffer((m, n), "float32"),
    ):
        T.func_attr(func_attrs(formats.symbol("bitmask", "cpu", "matmul", m, k, n, nnz=nnz)))
        over_rows(x, (bits, row_offsets, values), y)

    return bitmask_matmul


# --- Activation sparsity: gated, dual and segments (split-K over the active inputs) ----


def gated_matmul_func(m: int, k: int, n: int, per_channel: bool, k_parts: int = GATED_K_PARTS):
    """A TIR PrimFunc computing ``y = gate(x) @ W`` for a dense ``W``, skipping inactive inputs.

    ``gate(x)[m, k] = x[m, k] if |x[m, k]| > t else 0``, with ``t = threshold[k]`` when
    ``per_channel`` and ``threshold[0]`` otherwise. Parameters, in order: ``x`` float32
    [m, k], ``threshold`` float32 [k] or [1], ``w`` float32 [k, n] (the plain row-major
    weight: no packing), ``y`` float32 [m, n] (every element written). An input ``k`` is
    skipped, with its whole row of ``w``, when ``gate(x)[:, k]`` is zero in every row.
    Global symbol ``gated_matmul_m{m}_k{k}_n{n}_{channel|scalar}``.

    Each of ``k_parts`` parallel tasks accumulates an equal share of the active rows into
    its own ``[m, n]`` partial sum (a workspace of ``k_parts * m * n`` floats), two rows of
    ``w`` at a time, streaming them once per tile of ``SPARSE_ROW_TILE`` rows of ``x``;
    near the end of a pair of rows it prefetches the start of the next pair, wherever the
    skipped rows put it.

    Args:
        m: rows of ``x``; any positive value.
        k: reduction size.
        n: output size.
        per_channel: a threshold per input channel (``[k]``) rather than one (``[1]``).
        k_parts: parallel tasks over the active inputs (at least the number of cores).

    Returns:
        A ``tvm.tirx.PrimFunc``.

    Raises:
        ValueError: for a non-positive size or ``k_parts``, or a non-bool ``per_channel``.
    """
    from tvm.script import tirx as T

    check_sizes(m=m, k=k, n=n)
    check_gate(per_channel, k_parts)

    gate_tile = gate_tile_macro(per_channel)
    vectors = n // LANES
    # The last `ahead` vectors of a row prefetch the start of the next active row.
    ahead = min(PREFETCH_BYTES // (4 * LANES), vectors)
    in_row = vectors - ahead

    @T.macro
    def add_vector(partial, w, gated, p, rows_at, v, m0, tile_rows):
        for r in T.unroll(tile_rows):
            for t in T.vectorized(LANES):
                partial[p, m0 + r, v * LANES + t] = (
                    partial[p, m0 + r, v * LANES + t]
                    + gated[r] * w[rows_at[0], v * LANES + t]
                    + gated[tile_rows + r] * w[rows_at[1], v * LANES + t]
                )

    @T.macro
    def add_rows(partial, w, gated, p, rows_at, m0, tile_rows):
        # Two rows of w at once: two streams in flight and one read-modify-write of the
        # partial sum per two vectors of w.
        for v in range(in_row):
            T.evaluate(prefetch(T.address_of(w[rows_at[0], (v + ahead) * LANES])))
            T.evaluate(prefetch(T.address_of(w[rows_at[1], (v + ahead) * LANES])))
            add_vector(partial, w, gated, p, rows_at, v, m0, tile_rows)
        for v in range(in_row, vectors):
            T.evaluate(prefetch(T.address_of(w[rows_at[2], (v - in_row) * LANES])))
            T.evaluate(prefetch(T.address_of(w[rows_at[3], (v - in_row) * LANES])))
            add_vector(partial, w, gated, p, rows_at, v, m0, tile_rows)
        for r in T.unroll(tile_rows):
            for j in range(vectors * LANES, n):
                partial[p, m0 + r, j] = (
                    partial[p, m0 + r, j]
                    + gated[r] * w[rows_at[0], j]
                    + gated[tile_rows + r] * w[rows_at[1], j]
                )

    @T.macro
    def row_tile(x, threshold, weights, partial, p, rows_at, single, m0, tile_rows):
        (w,) = weights
        # gated[0:tile_rows] and gated[tile_rows:] are the gated inputs of the two rows; a
        # lone last row is paired with itself at a zero input.
        gated = T.alloc_buffer((2 * tile_rows,), "float32")
        gate_tile(gated, 0, x, threshold, rows_at[0], m0, tile_rows)
        gate_tile(gated, tile_rows, x, threshold, rows_at[1], m0, tile_rows)
        if single:
            for r in range(tile_rows):
                gated[tile_rows + r] = T.float32(0)
        add_rows(partial, w, gated, p, rows_at, m0, tile_rows)

    matmul = split_k(m, k, n, per_channel, k_parts, pairs_of_rows(m, row_tile))
    return gated_kernel(m, k, n, per_channel, formats.symbol("dense", "cpu", "gated", m, k, n, per_channel=per_channel), matmul)


def pack_dual_weight(weight: np.ndarray) -> list[np.ndarray]:
    """Packs a ``[K, N]`` weight for ``dual_matmul_func``: each input row as a bitmask over N.

    This is ``encode(weight.T, "bitmask")``: the bitmask format applied to ``W`` rather than
    ``W^T``, so that row ``k`` (everything an input ``k`` touches) is contiguous.

    Args:
        weight: the ``[K, N]`` float32 weight (``y = x @ weight``).

    Returns:
        ``[bits uint8 [K, ceil(N / 8)], row_offsets int32 [K + 1], values float32 [nnz]]``:
        bit ``b`` of ``bits[k, j]`` is set when ``weight[k, 8 j + b]`` is nonzero, and
        ``values[row_offsets[k]:row_offsets[k + 1]]`` are row ``k``'s nonzeros in order.

    Raises:
        ValueError: if ``weight`` is not a 2-D float32 array.
    """
    return formats.get("bitmask_rows").encode(weight)


def unpack_dual_weight(arrays: list[np.ndarray], k: int, n: int) -> np.ndarray:
    """Rebuilds the dense ``[k, n]`` weight from ``pack_dual_weight``'s arrays."""
    return formats.get("bitmask_rows").decode(arrays, (k, n))


def dual_matmul_func(
    m: int, k: int, n: int, nnz: int, per_channel: bool, k_parts: int = GATED_K_PARTS
):
    """A TIR PrimFunc computing ``y = gate(x) @ W`` for a sparse ``W`` from ``pack_dual_weight``.

    The gate is ``gated_matmul_func``'s. Parameters, in order: ``x`` float32 [m, k],
    ``threshold`` float32 [k] or [1], ``bits`` uint8 [k, ceil(n / 8)], ``row_offsets``
    int32 [k + 1], ``values`` float32 [nnz], ``y`` float32 [m, n] (every element written).
    An inactive input skips its row; an active one reads the row's ``n / 8`` bytes of
    bits and its nonzero values only, expanded 16 columns at a time (``vexpandps``) into
    the partial ``y``, two active rows at a time as in ``gated_matmul_func``. The bitmask
    beats per-row CSR here: at 50 % weight sparsity it reads 4.25 bytes per pair of
    weights against CSR's 6 (int16 indices), and it adds whole vectors to the partial
    ``y`` where CSR would scatter single values.
    Global symbol ``dual_matmul_m{m}_k{k}_n{n}_nnz{nnz}_{channel|scalar}``.

    Args:
        m: rows of ``x``; any positive value.
        k: reduction size.
        n: output size.
        nnz: stored nonzeros (may be 0).
        per_channel: a threshold per input channel (``[k]``) rather than one (``[1]``).
        k_parts: parallel tasks over the active inputs (at least the number of cores).

    Returns:
        A ``tvm.tirx.PrimFunc``.

    Raises:
        ValueError: for a non-positive size or ``k_parts``, a negative ``nnz`` or a
            non-bool ``per_channel``.
    """
    from tvm.script import tirx as T

    check_sizes(m=m, k=k, n=n)
    check_count("nnz", nnz)
    check_gate(per_channel, k_parts)

    gate_tile = gate_tile_macro(per_channel)
    row_bytes = -(-n // 8)
    chunks = n // LANES
    tail = n % LANES
    tail_bytes = -(-tail // 8)
    threshold_size = k if per_channel else 1
    ahead = PREFETCH_BYTES // 4
    bit_lines = -(-row_bytes // 64)

    # rows_at, per pair of rows (s = 0, 1 for the first and second row of the pair):
    # rows_at[s] the row, rows_at[2 + s] the row the next pair has in its place,
    # rows_at[4 + 2 s] and rows_at[5 + 2 s] where the row's values start and end, and
    # rows_at[8 + s] where the values of rows_at[2 + s] start. Like the rows, the offsets
    # are copied to the stack: the parameters, reached through the parallel closure, lose
    # `noalias` too.

    @T.macro
    def locate(weights, rows_at):
        row_offsets = weights[1]
        for s in range(2):
            rows_at[4 + 2 * s] = row_offsets[rows_at[s]]
            rows_at[5 + 2 * s] = row_offsets[rows_at[s] + 1]
            rows_at[8 + s] = row_offsets[rows_at[2 + s]]

    @T.macro
    def prefetch_values(values, offset, rows_at, s):
        # `ahead` values on, in this row or else in the one that follows it.
        T.evaluate(
            prefetch(
                T.address_of(
                    values[
                        T.if_then_else(
                            offset[0] + ahead < T.Cast(offset.dtype, rows_at[5 + 2 * s]),
                            offset[0] + ahead,
                            T.Cast(offset.dtype, rows_at[8 + s] - rows_at[5 + 2 * s])
                            + offset[0]
                            + ahead,
                        )
                    ]
                )
            )
        )

    @T.macro
    def expand_row(weight, bits, values, offset, rows_at, s, c, chunk_bytes):
        weight[T.Ramp(s * LANES, 1, LANES)] = expand(
            T.address_of(values[offset[0]]), bit_chunk(bits, rows_at[s], c, chunk_bytes)
        )
        offset[0] = offset[0] + T.Cast(
            offset.dtype, T.popcount(bit_chunk(bits, rows_at[s], c, chunk_bytes))
        )

    @T.macro
    def add_chunk(partial, weight, gated, bits, values, first, second, p, rows_at, c, chunk_bytes, m0, tile_rows):
        expand_row(weight, bits, values, first, rows_at, 0, c, chunk_bytes)
        expand_row(weight, bits, values, second, rows_at, 1, c, chunk_bytes)
        for r in T.unroll(tile_rows):
            for t in T.vectorized(LANES):
                partial[p, m0 + r, c * LANES + t] = (
                    partial[p, m0 + r, c * LANES + t]
                    + gated[r] * weight[t]
                    + gated[tile_rows + r] * weight[LANES + t]
                )

    @T.macro
    def row_tile(x, threshold, weights, partial, p, rows_at, single, m0, tile_rows):
        bits, row_offsets, values = weights
        # Two rows at once: four streams in flight (two of bits, two of values) and one
        # read-modify-write of the partial sum for both. A lone last row is paired with
        # itself at a zero input. The two value offsets differ in type only so that LLVM's
        # SLP vectoriser does not pack their identical updates into one vector register,
        # from which it would extract them again for every chunk.
        gated = T.alloc_buffer((2 * tile_rows,), "float32")
        weight = T.alloc_buffer((2 * LANES,), "float32")
        first = T.alloc_buffer((1,), "int32")
        second = T.alloc_buffer((1,), "int64")
        gate_tile(gated, 0, x, threshold, rows_at[0], m0, tile_rows)
        gate_tile(gated, tile_rows, x, threshold, rows_at[1], m0, tile_rows)
        if single:
            for r in range(tile_rows):
                gated[tile_rows + r] = T.float32(0)
        for s in T.unroll(2):
            for line in range(bit_lines):
                T.evaluate(prefetch(T.address_of(bits[rows_at[2 + s], line * 64])))
        first[0] = rows_at[4]
        second[0] = T.Cast("int64", rows_at[6])
        for c in range(chunks):
            prefetch_values(values, first, rows_at, 0)
            prefetch_values(values, second, rows_at, 1)
            add_chunk(
                partial, weight, gated, bits, values, first, second, p, rows_at, c, 2, m0,
                tile_rows,
            )
        if tail > 0:
            add_chunk(
                partial, weight, gated, bits, values, first, second, p, rows_at, chunks,
                tail_bytes, m0, tile_rows,
            )

    matmul = split_k(m, k, n, per_channel, k_parts, pairs_of_rows(m, row_tile, 10, locate))

    @T.prim_func
    def dual_matmul(
        x: T.Buffer((m, k), "float32"),
        threshold: T.Buffer((threshold_size,), "float32"),
        bits: T.Buffer((k, row_bytes), "uint8"),
        row_offsets: T.Buffer((k + 1,), "int32"),
        values: T.Buffer((nnz,), "float32"),
        y: T.Buffer((m, n), "float32"),
    ):
        T.func_attr(func_attrs(formats.symbol("bitmask_rows", "cpu", "gated", m, k, n, nnz=nnz, per_channel=per_channel)))
        matmul(x, threshold, (bits, row_offsets, values), y)

    return dual_matmul


# --- Row gathers: the embedding lookup of a sparse tied output projection --------------
#
# An output projection tied to the embedding table ``E`` [N, K] has ``W = E^T``, so the
# formats' rows of ``W^T`` are the rows of ``E``: the lookup of token ``v`` densifies row
# ``v`` of the arrays the projection's kernel reads, and the table is stored once. A
# lookup writes a few hundred floats per token, so the loops are serial (waking the thread
# pool would cost more than the work).


def csr_gather_func(rows: int, k: int, n: int, nnz: int, index_dtype: str = "int16", id_dtype: str = "int64"):
    """A TIR PrimFunc gathering rows of ``W^T`` from ``encode(W, "csr")``:
    ``y[r, :] = W^T[ids[r], :]``.

    Parameters, in order: ``ids`` ``id_dtype`` [rows] (each in ``[0, n)``: not checked
    here), ``indptr`` int32 [n + 1], ``indices`` ``index_dtype`` [nnz], ``values`` float32
    [nnz], ``y`` float32 [rows, k] (every element written: zeros, then the row's nonzeros
    at their columns). Global symbol
    ``csr_gather_r{rows}_k{k}_n{n}_nnz{nnz}_{index_dtype}_{id_dtype}``.

    Raises:
        ValueError: for a non-positive size, a negative ``nnz``, or an unknown index or id
            dtype.
    """
    from tvm.script import tirx as T

    check_gather(rows, k, n, nnz, id_dtype)
    check_index_dtype(index_dtype)

    @T.prim_func
    def csr_gather(
        ids: T.Buffer((rows,), id_dtype),
        indptr: T.Buffer((n + 1,), "int32"),
        indices: T.Buffer((nnz,), index_dtype),
        values: T.Buffer((nnz,), "float32"),
        y: T.Buffer((rows, k), "float32"),
    ):
        T.func_attr(func_attrs(formats.symbol("csr", "cpu", "gather", rows, k, n, nnz=nnz, index_dtype=index_dtype, id_dtype=id_dtype)))
        for r in range(rows):
            for c in range(k):
                y[r, c] = T.float32(0)
            for j in range(indptr[ids[r]], indptr[ids[r] + 1]):
                y[r, T.Cast("int32", indices[j])] = values[j]

    return csr_gather


def bitmask_gather_func(rows: int, k: int, n: int, nnz: int, id_dtype: str = "int64"):
    """A TIR PrimFunc gathering rows of ``W^T`` from ``encode(W, "bitmask")``:
    ``y[r, :] = W^T[ids[r], :]``.

    Parameters, in order: ``ids`` ``id_dtype`` [rows] (each in ``[0, n)``: not checked
    here), ``bits`` uint8 [n, ceil(k / 8)], ``row_offsets`` int32 [n + 1], ``values``
    float32 [nnz], ``y`` float32 [rows, k] (every element written). Column ``c`` of a row
    takes the row's next value where its bit is set, zero elsewhere. Global symbol
    ``bitmask_gather_r{rows}_k{k}_n{n}_nnz{nnz}_{id_dtype}``.

    Raises:
        ValueError: for a non-positive size, a negative ``nnz`` or an unknown id dtype.
    """
    from tvm.script import tirx as T

    check_gather(rows, k, n, nnz, id_dtype)
    row_bytes = -(-k // 8)

    @T.prim_func
    def bitmask_gather(
        ids: T.Buffer((rows,), id_dtype),
        bits: T.Buffer((n, row_bytes), "uint8"),
        row_offsets: T.Buffer((n + 1,), "int32"),
        values: T.Buffer((nnz,), "float32"),
        y: T.Buffer((rows, k), "float32"),
    ):
        T.func_attr(func_attrs(formats.symbol("bitmask", "cpu", "gather", rows, k, n, nnz=nnz, id_dtype=id_dtype)))
        for r in range(rows):
            offset = T.alloc_buffer((1,), "int32")
            offset[0] = row_offsets[ids[r]]
            for c in range(k):
                if T.bitwise_and(T.shift_right(T.Cast("int32", bits[ids[r], c // 8]), c % 8), 1) == 1:
                    y[r, c] = values[offset[0]]
                    offset[0] = offset[0] + 1
                else:
                    y[r, c] = T.float32(0)

    return bitmask_gather
# --- Dual-sparse over runs of columns: block-pruned weights ------------------------------


def pack_segment_weight(weight: np.ndarray) -> list[np.ndarray]:
    """Packs a ``[K, N]`` weight (``N >= 16``) for ``segment_matmul_func``: each input row as
    windows of ``LANES`` consecutive columns that hold all its nonzeros.

    Row ``k`` is covered left to right: a window starts at the first nonzero not yet
    covered and holds the row's 16 values there, zeros included; at the end of the row it
    is moved left to ``N - LANES``, with zeros in the lanes the window before it holds. A weight pruned in blocks of 16 outputs that read one
    input (``16x1`` blocks of ``W^T``) is exactly one window per block; an unstructured
    one is nearly dense here, and ``pack_dual_weight`` is the smaller format for it
    (``targets.legalize`` keeps whichever packing has fewer bytes).

    Returns:
        ``[row_offsets int32 [K + 1], starts int32 [S], values float32 [S * LANES]]``:
        row ``k``'s windows are ``row_offsets[k] .. row_offsets[k + 1]``, window ``s``
        covers columns ``starts[s] .. starts[s] + LANES`` with values
        ``values[s * LANES : (s + 1) * LANES]``.

    Raises:
        ValueError: if ``weight`` is not a 2-D float32 array with at least 16 columns.
    """
    return formats.get("segments").encode(weight)


def unpack_segment_weight(arrays: list[np.ndarray], k: int, n: int) -> np.ndarray:
    """Rebuilds the dense ``[k, n]`` weight from ``pack_segment_weight``'s arrays."""
    return formats.get("segments").decode(arrays, (k, n))


def segment_matmul_func(m: int, k: int, n: int, segments: int, per_channel: bool, k_parts: int = GATED_K_PARTS):
    """A TIR PrimFunc computing ``y = gate(x) @ W`` for ``W`` from ``pack_segment_weight``.

    The gate and the three steps are ``dual_matmul_func``'s; an active input adds its
    windows, one 16-lane multiply-add each at the window's column, into the partial ``y``.
    Where ``dual_matmul_func`` expands every 16 columns of an active row whatever its
    density, this one does work only where the row has nonzeros, which for 16x1 blocks at
    70 % sparsity is a third of the columns. Parameters, in order: ``x`` float32 [m, k],
    ``threshold`` float32 [k] or [1], ``row_offsets`` int32 [k + 1], ``starts`` int32
    [segments], ``values`` float32 [segments * 16], ``y`` float32 [m, n] (every element
    written). Global symbol
    ``dual_matmul_m{m}_k{k}_n{n}_nnz{16 segments}_{channel|scalar}_seg``.

    Raises:
        ValueError: for a non-positive size or ``k_parts``, ``n < 16``, a negative
            ``segments`` or a non-bool ``per_channel``.
    """
    from tvm.script import tirx as T

    check_sizes(m=m, k=k, n=n)
    check_count("segments", segments)
    check_gate(per_channel, k_parts)
    if n < LANES:
        raise ValueError(f"n must be at least {LANES}, got {n}")

    gate_tile = gate_tile_macro(per_channel)
    threshold_size = k if per_channel else 1
    ahead = PREFETCH_BYTES // 4
    windows = max(segments, 1)
    stored = windows * LANES

    # Prefetch. Rows much shorter than PREFETCH_BYTES (576 columns at 70 %: 0.7 KB) are
    # prefetched whole, `rows_ahead` active rows on, so no prefetch lands in the inactive
    # rows between them; longer rows stream `ahead` values on, into the next active row.
    row_bytes = segments * LANES * 4 / k
    row_prefetch = row_bytes < PREFETCH_BYTES / 2
    rows_ahead = min(16, max(1, int(np.ceil(PREFETCH_BYTES / max(row_bytes, 1.0)))))

    @T.macro
    def prefetch_row(weights, row):
        row_offsets, starts, values = weights
        for s in range(row_offsets[row], row_offsets[row + 1]):
            T.evaluate(prefetch(T.address_of(values[s * LANES])))
        for s in range(row_offsets[row] // LANES, (row_offsets[row + 1] + LANES - 1) // LANES):
            T.evaluate(prefetch(T.address_of(starts[T.min(s * LANES, windows - 1)])))

    @T.macro
    def locate(weights, rows_at, next_row):
        # rows_at: the row, where its windows start and end, where the next active row's
        # windows start.
        row_offsets = weights[0]
        rows_at[1] = row_offsets[rows_at[0]]
        rows_at[2] = row_offsets[rows_at[0] + 1]
        rows_at[3] = row_offsets[next_row]

    @T.macro
    def row_tile(x, threshold, weights, partial, p, rows_at, m0, tile_rows):
        row_offsets, starts, values = weights
        gated = T.alloc_buffer((tile_rows,), "float32")
        gate_tile(gated, 0, x, threshold, rows_at[0], m0, tile_rows)
        for s in range(rows_at[1], rows_at[2]):
            if not row_prefetch:
                # `ahead` values on, in this row or else at the start of the next active one.
                T.evaluate(prefetch(T.address_of(values[T.if_then_else(
                    s * LANES + ahead < rows_at[2] * LANES, s * LANES + ahead,
                    T.min(rows_at[3] * LANES + s * LANES + ahead - rows_at[2] * LANES, stored - 1))])))
            for r in T.unroll(tile_rows):
                for t in T.vectorized(LANES):
                    partial[p, m0 + r, starts[s] + t] = partial[p, m0 + r, starts[s] + t] + gated[r] * values[s * LANES + t]

    walk = single_rows(m, k, row_tile, locate, prefetch_row if row_prefetch else None, rows_ahead)
    matmul = split_k(m, k, n, per_channel, k_parts, walk)

    @T.prim_func
    def segment_matmul(
        x: T.Buffer((m, k), "float32"),
        threshold: T.Buffer((threshold_size,), "float32"),
        row_offsets: T.Buffer((k + 1,), "int32"),
        starts: T.Buffer((windows,), "int32"),
        values: T.Buffer((stored,), "float32"),
        y: T.Buffer((m, n), "float32"),
    ):
        T.func_attr(func_attrs(
            formats.symbol("segments", "cpu", "gated", m, k, n, nnz=segments * LANES, per_channel=per_channel)))
        matmul(x, threshold, (row_offsets, starts, values), y)

    return segment_matmul


#: The CPU's kernels by weight format: ``targets.tvm_import`` calls the entry named by a
#: sparse op's ``format`` (csr, bsr, bitmask) or by a gated op's ``dual`` (gated: a dense
#: weight; dual: ``pack_dual_weight``'s rows; segments: ``pack_segment_weight``'s windows).
KERNELS = kernel_table(
    csr=csr_matmul_func,
    bsr=bsr_matmul_func,
    bitmask=bitmask_matmul_func,
    gated=gated_matmul_func,
    dual=dual_matmul_func,
    segments=segment_matmul_func,
)
