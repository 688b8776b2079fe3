"""The loop patterns of the CUDA sparse kernels, each written once.

As in ``targets.cpu.skeletons`` (and TVM's dlight rules, one schedule per loop pattern), a
skeleton is the thread-bound driver of one pattern, built for one shape as a TVMScript
macro, and a kernel in ``targets.cuda.sparse_kernels`` is a small body per weight format
that the skeleton inlines.

``parallel_rows`` -- parallel over output rows (csr, bsr). A group of threads per output
row (or block row of ``R x C`` blocks), several groups per thread block. Thread ``lane``
of a group takes the row's stored elements (nonzeros or blocks) ``lane // (R*C)``,
``+ group / (R*C)``, ..., ``SPARSE_UNROLL`` of them per step, so the group reads each
step's elements as one contiguous run; for blocks, the thread owns position ``(r, c) =
divmod(lane % (R*C), C)`` of each. CSR is the case ``R = C = 1`` with a warp per row.

``split_k`` -- split-K over the active inputs (gated, dual), for ``y = gate(x) @ W`` with
``gate(x)[m, k] = x[m, k] if |x[m, k]| > t else 0``. The grid is (``ceil(N / 32)`` column
tiles, ``k_parts`` slices of K): a block has ``GATED_WARPS`` warps, warp ``w`` takes rows
``w, w + 8, ...`` of its slice (``GATED_ROW_UNROLL`` at a time) and lane ``l`` column
``l`` of its tile. For each row the warp computes the gate and skips the row (a
warp-uniform branch) when no row of ``x`` is active there, so an inactive input costs no
weight read at all. The warps' sums are reduced in shared memory into one partial sum per
(slice, m, column) in a global workspace ``partials[k_parts, m * n]``, and a second kernel
adds the ``k_parts`` partials into ``y`` (no atomics, so the result does not depend on the
order blocks run in).

Both end in ``reduction``: the phases that add the partial sums each thread leaves in a
shared buffer ``lanes[item, lane]`` ("Reductions" in ``targets.cuda.sparse_kernels``).
"""

from __future__ import annotations

from targets.kernel_args import check_sizes

#: Rows of ``x`` a kernel takes: the per-thread accumulators are ``m`` registers, and a
#: larger batch is no longer a matrix-vector product (dense GEMM schedules serve it).
MAX_ROWS = 8
#: Threads in a warp.
WARP = 32
#: Steps of the CSR and BSR loops over a row's nonzeros (or blocks) issued together,
#: unrolled, so that a warp has that many independent weight loads in flight.
SPARSE_UNROLL = 4
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
#: first (see "Reductions" in ``targets.cuda.sparse_kernels``).
SERIAL_LANES = 8


def check_rows(m: int) -> None:
    """Raises ValueError unless ``m`` is a row count the kernels take (1 to ``MAX_ROWS``)."""
    check_sizes(m=m)
    if m > MAX_ROWS:
        raise ValueError(f"the CUDA sparse kernels take at most {MAX_ROWS} rows of x, got m={m}")


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def fold_width(lanes: int) -> int:
    """Lanes left after the fold phase: all of them up to ``SERIAL_LANES``, else about
    the square root, so that the fold and the last phase each add a few values."""
    if lanes <= SERIAL_LANES:
        return lanes
    return 1 << ((lanes.bit_length() - 1) // 2)


def reduction(threads: int, items: int, lane_count: int):
    """The reduction phases of a thread block of ``threads`` threads whose partial sums
    are ``lanes[item, lane]`` (``items x lane_count``, shared).

    Returns ``(width, fold_lanes, sum_lanes)``: ``width`` lanes are left per item after
    the macro ``fold_lanes(lanes, folded)`` (one phase computing ``folded[i, w] = sum_u
    lanes[i, w + u * width]``, or none when no fold is needed), and the macro
    ``sum_lanes(total, lanes, folded, item)`` adds those of ``item`` into the local
    ``total[0]``.
    """
    from tvm.script import tirx as T

    width = fold_width(lane_count)

    @T.macro
    def fold_lanes(lanes, folded):
        if width < lane_count:
            for t in T.thread_binding(threads, thread="threadIdx.x"):
                for u in range(ceil_div(items * width, threads)):
                    slot = t + u * threads  # (item, lane left) = divmod(slot, width)
                    if slot < items * width:
                        total = T.alloc_buffer((1,), "float32", scope="local")
                        total[0] = T.float32(0)
                        for f in range(lanes.shape[1] // width):
                            total[0] = total[0] + lanes[slot // width, slot % width + f * width]
                        folded[slot // width, slot % width] = total[0]

    @T.macro
    def sum_lanes(total, lanes, folded, item):
        total[0] = T.float32(0)
        if width < lane_count:
            for w in range(width):
                total[0] = total[0] + folded[item, w]
        else:
            for w in range(width):
                total[0] = total[0] + lanes[item, w]

    return width, fold_lanes, sum_lanes


# --- Parallel over output rows ----------------------------------------------------------


def parallel_rows(m: int, n: int, block: tuple[int, int], group: int, groups: int, accumulate):
    """The macro ``over_rows(x, weights, y)`` (see the module docstring) for ``weights`` a
    tuple whose first array is ``indptr`` over the ``ceil(n / R)`` rows of ``R x C``
    blocks, ``group`` threads per row (a multiple of ``R * C``) and ``groups`` rows per
    thread block. For each stored element ``j`` a thread takes, the body
    ``accumulate(acc, x, weights, j, lane)`` adds into the thread's ``acc[0:m]``
    (``lane``: the thread's position in its group)."""
    from tvm.script import tirx as T

    block_r, block_c = block
    block_size = block_r * block_c
    block_rows = ceil_div(n, block_r)
    threads = group * groups
    per_step = group // block_size  # blocks a group reads per step
    lane_count = group // block_r  # threads that share one output row r
    items = groups * m * block_r  # (block row, row of x, r)
    width, fold_lanes, sum_lanes = reduction(threads, items, lane_count)

    @T.macro
    def over_rows(x, weights, y):
        indptr = weights[0]
        for bx in T.thread_binding(ceil_div(block_rows, groups), thread="blockIdx.x"):
            lanes = T.alloc_buffer((items, lane_count), "float32", scope="shared")
            folded = T.alloc_buffer((items, width), "float32", scope="shared")
            for t in T.thread_binding(threads, thread="threadIdx.x"):
                row = bx * groups + t // group
                lane = t % group  # block slot lane // (R*C), then (r, c)
                acc = T.alloc_buffer((m,), "float32", scope="local")
                for r in range(m):
                    acc[r] = T.float32(0)
                if row < block_rows:
                    for s in range(
                        (indptr[row + 1] - indptr[row] + per_step * SPARSE_UNROLL - 1)
                        // (per_step * SPARSE_UNROLL)
                    ):
                        for u in T.unroll(SPARSE_UNROLL):
                            j = indptr[row] + lane // block_size + (s * SPARSE_UNROLL + u) * per_step
                            if j < indptr[row + 1]:
                                accumulate(acc, x, weights, j, lane)
                # Output row r = lane % (R*C) // C gathers the lanes (block slot, c).
                for r in range(m):
                    lanes[
                        ((t // group) * m + r) * block_r + lane % block_size // block_c,
                        lane // block_size * block_c + lane % block_c,
                    ] = acc[r]
            fold_lanes(lanes, folded)
            for t in T.thread_binding(threads, thread="threadIdx.x"):
                for u in range(ceil_div(items, threads)):
                    item = t + u * threads
                    row = bx * groups + item // (m * block_r)
                    if item < items and row < block_rows:
                        if row * block_r + item % block_r < n:
                            total = T.alloc_buffer((1,), "float32", scope="local")
                            sum_lanes(total, lanes, folded, item)
                            y[item // block_r % m, row * block_r + item % block_r] = total[0]

    return over_rows


# --- Split-K over the active inputs -----------------------------------------------------


def default_k_parts(k: int, n: int) -> int:
    """Slices of K for the split-K kernels when none is given: enough that the grid has
    about ``GATED_TARGET_BLOCKS`` blocks, and at most one per ``GATED_WARPS * 8`` rows, so
    that each warp still walks several rows."""
    tiles = ceil_div(n, WARP)
    return max(1, min(ceil_div(GATED_TARGET_BLOCKS, tiles), k // (GATED_WARPS * 8)))


def split_k(m: int, k: int, n: int, per_channel: bool, k_parts: int, add_row):
    """The macro ``split_k_matmul(x, threshold, weights, y)`` (see the module docstring):
    both kernels, with the body ``add_row(acc, gated, weights, kk, bx, lane)`` adding
    ``gated[0:m] * W[kk, 32 bx + lane]`` into the thread's ``acc[0:m]`` for an active row
    ``kk``."""
    from tvm.script import tirx as T

    threads = WARP * GATED_WARPS
    items = m * WARP  # (row of x, column of the tile)
    width, fold_lanes, sum_lanes = reduction(threads, items, GATED_WARPS)
    k_slice = ceil_div(k, k_parts)

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
            for s in range(ceil_div(k_slice, GATED_WARPS * GATED_ROW_UNROLL)):
                for u in T.unroll(GATED_ROW_UNROLL):
                    slot = t // WARP + (s * GATED_ROW_UNROLL + u) * GATED_WARPS
                    kk = by * k_slice + slot
                    if slot < k_slice and kk < k:
                        gate_row(x, threshold, kk, gated, live)
                        if live[0] == 1:
                            add_row(acc, gated, weights, kk, bx, t % WARP)
            for r in range(m):
                lanes[r * WARP + t % WARP, t // WARP] = acc[r]
        fold_lanes(lanes, folded)
        for t in T.thread_binding(threads, thread="threadIdx.x"):
            for u in range(ceil_div(items, threads)):
                item = t + u * threads
                if item < items and bx * WARP + item % WARP < n:
                    total = T.alloc_buffer((1,), "float32", scope="local")
                    sum_lanes(total, lanes, folded, item)
                    partials[by, item // WARP * n + bx * WARP + item % WARP] = total[0]

    @T.macro
    def add_partials(partials, y):
        for b in T.thread_binding(ceil_div(m * n, REDUCE_THREADS), thread="blockIdx.x"):
            for t in T.thread_binding(REDUCE_THREADS, thread="threadIdx.x"):
                if b * REDUCE_THREADS + t < m * n:
                    total = T.alloc_buffer((1,), "float32", scope="local")
                    total[0] = T.float32(0)
                    for p in range(k_parts):
                        total[0] = total[0] + partials[p, b * REDUCE_THREADS + t]
                    y[(b * REDUCE_THREADS + t) // n, (b * REDUCE_THREADS + t) % n] = total[0]

    @T.macro
    def split_k_matmul(x, threshold, weights, y):
        partials = T.alloc_buffer((k_parts, m * n), "float32")
        for bx in T.thread_binding(ceil_div(n, WARP), thread="blockIdx.x"):
            for by in T.thread_binding(k_parts, thread="blockIdx.y"):
                split_k_block(x, threshold, weights, partials, bx, by)
        add_partials(partials, y)

    return split_k_matmul
