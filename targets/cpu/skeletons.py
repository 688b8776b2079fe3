"""The loop patterns of the CPU's sparse kernels, each written once.

Like TVM's dlight rules (``tvm/s_tir/dlight/cpu/gemv.py``: one schedule per loop pattern,
whatever the operator), a skeleton here is the driver of one pattern, and a kernel in
``targets.cpu.sparse_kernels`` is a small body per weight format that the skeleton calls.
Every skeleton is a TVMScript macro built for one shape, so a kernel's PrimFunc is the
skeleton with the body inlined: the generated TIR is what a kernel written out by hand
would be.

``parallel_rows`` -- parallel over output rows (csr, bsr, bitmask). Task ``i`` computes
``y[:, i]`` (or block row ``i``): it walks the weight arrays of row ``i`` in storage order
once per tile of up to ``tile`` rows of ``x``, so one pass over the weights serves a
whole tile::

    for i in parallel(outputs):
        for each tile [m0, m0 + rows) of the rows of x:
            row_tile(x, weights, y, i, m0, rows)

``split_k`` -- split-K over the active inputs (gated, dual, segments), for
``y = gate(x) @ W`` with ``gate(x)[m, k] = x[m, k] if |x[m, k]| > t else 0`` and ``t`` a
float32 threshold of shape [1] or [K] (per input channel). An inactive input ``k`` (zero
after the gate in every row of ``x``) skips its whole row of ``W`` ([K, N], by input). Three
steps:

  1. serially, list the active inputs: k such that |x[m, k]| > t for some row m
     (``active[0 .. count)``, with ``count`` kept in ``active[k]``);
  2. in parallel, task p takes the p-th of ``k_parts`` equal slices of that list and
     adds gate(x)[:, k] * W[k, :] for each of its k into its own partial y (a workspace of
     ``k_parts * m * n`` floats); equal slices balance the tasks whatever the pattern of
     active inputs, and knowing the next active row lets the prefetch run ahead across
     the skipped ones;
  3. in parallel over columns, y is the sum of the partials.

  Step 2 walks a task's slice in one of two ways: ``pairs_of_rows`` (two rows of ``W``
  at a time: two streams in flight and one read-modify-write of the partial sum for
  both) or ``single_rows`` (with a prefetch of whole rows some active rows ahead, for
  rows much shorter than ``PREFETCH_BYTES``).

TVM 0.27 facts that shape the code: every "local"-scope buffer goes to the heap workspace,
so accumulators are default-scope ``T.alloc_buffer``s under 1024 bytes, which become stack
slots that LLVM keeps in registers; and heap workspace buffers, and parameters once inside
a ``T.parallel`` body, may alias each other as far as LLVM knows, so values read from them
that a loop reuses are first copied to a stack buffer (``rows_at``).
"""

from __future__ import annotations

from targets.cpu.simd import LANES

#: Rows of ``x`` handled per pass over a weight row. ``SPARSE_ROW_TILE * LANES`` fp32
#: accumulators are 512 bytes, below TVM's 1024-byte limit for stack buffers.
SPARSE_ROW_TILE = 8
#: Parallel tasks in the gated and dual kernels, each with an equal share of the active
#: inputs and its own partial ``y``: at least the number of cores, and few, as every
#: task's partial is zeroed and summed on each call.
GATED_K_PARTS = 8
#: Partial sums (tasks x rows x columns) below which step 3 runs on one core.
REDUCE_SERIAL_BELOW = 16384


def row_tiles(m: int, tile: int) -> tuple[int, int, int]:
    """``(rows per full tile, full tiles, rows in the last partial tile)`` for ``m`` rows."""
    rows = min(m, tile)
    return rows, m // rows, m % rows


# --- Parallel over output rows ----------------------------------------------------------


def parallel_rows(m: int, outputs: int, tile: int, row_tile):
    """The macro ``over_rows(x, weights, y)``: task ``i`` of ``outputs`` parallel tasks
    calls ``row_tile(x, weights, y, i, m0, rows)`` for each tile ``[m0, m0 + rows)`` of
    the ``m`` rows of ``x``, ``tile`` rows at most; ``weights`` is the tuple of the
    format's arrays."""
    from tvm.script import tirx as T

    rows, full_tiles, tail_rows = row_tiles(m, tile)

    @T.macro
    def over_rows(x, weights, y):
        for i in T.parallel(outputs):
            for t in range(full_tiles):
                row_tile(x, weights, y, i, t * rows, rows)
            if tail_rows > 0:
                row_tile(x, weights, y, i, full_tiles * rows, tail_rows)

    return over_rows


# --- Split-K over the active inputs -----------------------------------------------------


def gate_tile_macro(per_channel: bool):
    """The macro ``gate_tile(gated, base, x, threshold, kk, m0, tile_rows)``:
    ``gated[base + r] = gate(x)[m0 + r, kk]`` for the rows of one tile."""
    from tvm.script import tirx as T

    @T.macro
    def gate_tile(gated, base, x, threshold, kk, m0, tile_rows):
        for r in range(tile_rows):
            gated[base + r] = T.if_then_else(
                T.abs(x[m0 + r, kk]) > _threshold_at(threshold, kk, per_channel), x[m0 + r, kk], T.float32(0)
            )

    return gate_tile


def _threshold_at(threshold, kk, per_channel: bool):
    return threshold[kk] if per_channel else threshold[0]


def split_k(m: int, k: int, n: int, per_channel: bool, k_parts: int, walk):
    """The macro ``split_k_matmul(x, threshold, weights, y)``: steps 1 to 3 of the module
    docstring, with step 2 of task ``p`` being ``walk(x, threshold, weights, active,
    partial, p, first, end)`` over ``active[first:end]`` (``pairs_of_rows`` or
    ``single_rows``)."""
    from tvm.script import tirx as T

    padded_n = -(-n // LANES) * LANES

    @T.macro
    def list_active(x, threshold, active):
        flag = T.alloc_buffer((1,), "int32")
        active[k] = 0
        for kk in range(k):
            flag[0] = 0
            for mm in range(m):
                if T.abs(x[mm, kk]) > _threshold_at(threshold, kk, per_channel):
                    flag[0] = 1
            if flag[0] == 1:
                active[active[k]] = kk
                active[k] = active[k] + 1

    @T.macro
    def zero_partial(partial, p, padded_n):
        for mm in range(m):
            for j in T.vectorized(padded_n):
                partial[p, mm, j] = T.float32(0)

    def columns(vectors, parts):
        # Summing a few thousand partials is cheaper on one core than waking the pool.
        return T.parallel(vectors) if vectors * LANES * parts * m >= REDUCE_SERIAL_BELOW else T.serial(vectors)

    @T.macro
    def reduce_partials(partial, y, parts, n):
        for v in columns(n // LANES, parts):
            for mm in range(m):
                total = T.alloc_buffer((LANES,), "float32")
                for t in T.vectorized(LANES):
                    total[t] = partial[0, mm, v * LANES + t]
                for p in range(1, parts):
                    for t in T.vectorized(LANES):
                        total[t] = total[t] + partial[p, mm, v * LANES + t]
                for t in T.vectorized(LANES):
                    y[mm, v * LANES + t] = total[t]
        for mm in range(m):
            for j in range(n // LANES * LANES, n):
                y[mm, j] = partial[0, mm, j]
                for p in range(1, parts):
                    y[mm, j] = y[mm, j] + partial[p, mm, j]

    @T.macro
    def split_k_matmul(x, threshold, weights, y):
        active = T.alloc_buffer((k + 1,), "int32")
        partial = T.alloc_buffer((k_parts, m, padded_n), "float32")
        list_active(x, threshold, active)
        for p in T.parallel(k_parts):
            zero_partial(partial, p, padded_n)
            walk(x, threshold, weights, active, partial, p, active[k] * p // k_parts, active[k] * (p + 1) // k_parts)
        reduce_partials(partial, y, k_parts, n)

    return split_k_matmul


def pairs_of_rows(m: int, row_tile, rows_at_size: int = 4, locate=None):
    """A ``walk`` for ``split_k``: the slice two active rows at a time.

    Per pair, ``rows_at`` (a stack buffer of ``rows_at_size`` int32) holds the two rows in
    ``rows_at[0:2]`` and the next pair's in ``rows_at[2:4]`` (clamped to the slice, for
    the prefetch); ``locate(weights, rows_at)``, when given, fills the rest. Then
    ``row_tile(x, threshold, weights, partial, p, rows_at, single, m0, rows)`` runs per
    tile of ``SPARSE_ROW_TILE`` rows of ``x``, ``single`` being true for a lone last row
    (which the body pairs with itself at a zero input).
    """
    from tvm.script import tirx as T

    rows, full_tiles, tail_rows = row_tiles(m, SPARSE_ROW_TILE)

    @T.macro
    def walk(x, threshold, weights, active, partial, p, first, end):
        for q in range((end - first + 1) // 2):
            # Copied to the stack once per pair: `active` and `partial` are both heap
            # workspace, which may alias for all LLVM knows, so reading `active`
            # inside the rows would repeat the load after every store to `partial`.
            rows_at = T.alloc_buffer((rows_at_size,), "int32")
            for i in range(4):
                rows_at[i] = active[T.min(first + 2 * q + i, end - 1)]
            if locate is not None:
                locate(weights, rows_at)
            for t in range(full_tiles):
                row_tile(x, threshold, weights, partial, p, rows_at, first + 2 * q + 1 == end, t * rows, rows)
            if tail_rows > 0:
                row_tile(
                    x, threshold, weights, partial, p, rows_at, first + 2 * q + 1 == end, full_tiles * rows, tail_rows
                )

    return walk


def single_rows(m: int, k: int, row_tile, locate, prefetch_row=None, rows_ahead: int = 0):
    """A ``walk`` for ``split_k``: the slice one active row at a time.

    Per row, ``rows_at`` (a stack buffer of 4 int32) holds the row in ``rows_at[0]``;
    ``locate(weights, rows_at, next_row)`` fills the rest, ``next_row`` being the next
    active row (clamped to the whole list). Then ``row_tile(x, threshold, weights,
    partial, p, rows_at, m0, rows)`` runs per tile of ``SPARSE_ROW_TILE`` rows of ``x``.
    With ``prefetch_row``, the macro ``prefetch_row(weights, row)`` runs on the row
    ``rows_ahead`` active rows on (and on the first ``rows_ahead`` rows before the walk),
    so no prefetch lands in the inactive rows between them.
    """
    from tvm.script import tirx as T

    rows, full_tiles, tail_rows = row_tiles(m, SPARSE_ROW_TILE)

    @T.macro
    def walk(x, threshold, weights, active, partial, p, first, end):
        if prefetch_row is not None:
            for q in range(T.min(rows_ahead, end - first)):
                prefetch_row(weights, active[first + q])
        for q in range(end - first):
            if prefetch_row is not None:
                if first + q + rows_ahead < end:
                    prefetch_row(weights, active[first + q + rows_ahead])
            # Copied to the stack, as in pairs_of_rows.
            rows_at = T.alloc_buffer((4,), "int32")
            rows_at[0] = active[first + q]
            locate(weights, rows_at, active[T.min(first + q + 1, active[k] - 1)])
            for t in range(full_tiles):
                row_tile(x, threshold, weights, partial, p, rows_at, t * rows, rows)
            if tail_rows > 0:
                row_tile(x, threshold, weights, partial, p, rows_at, full_tiles * rows, tail_rows)

    return walk
