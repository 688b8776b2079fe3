"""Dense fp32 matmul kernels for the CPU, written directly in low-level TIR.

The kernel computes ``y[M, N] = x[M, K] @ W[K, N]`` where ``W`` is a constant weight that
is packed once, ahead of time, into column panels::

    Wp[p, k, j] = W[k, p * PANEL_WIDTH + j]        (zero where p * PANEL_WIDTH + j >= N)
    Wp.shape    = (ceil(N / PANEL_WIDTH), K, PANEL_WIDTH)

so each panel, ``PANEL_WIDTH`` columns of ``W``, is one contiguous run of
``K * PANEL_WIDTH`` floats: one cache line per ``k``.

Each parallel task owns a pair of adjacent panels (32 output columns). It walks ``x`` in
tiles of ``ROW_TILE`` rows, keeps the ``ROW_TILE x 32`` block of ``y`` in 16 vector
registers, and streams both panels once per row tile: per ``k``, two vector loads of
``Wp``, one broadcast of each ``x[m, k]`` and two FMAs per row. At decode (``M = 1``) the
kernel is bound by the bandwidth of reading ``Wp`` from DRAM, and the two concurrent
streams plus a software prefetch ``PREFETCH_BYTES`` ahead in each keep enough reads in
flight to saturate it. At prefill the pair of panels (``K * 128`` bytes) stays in L2 while
every row tile reuses it.

The kernel's output is ``y[M, N]``: the zero padding of the last panel is never written.
"""

from __future__ import annotations

import numpy as np

import formats
from formats import panels as panels_format

from targets.cpu.simd import PREFETCH_BYTES, prefetch
from targets.kernel_args import func_attrs

#: Columns per panel: one 512-bit vector of fp32, so one row of a panel is one cache line.
PANEL_WIDTH = panels_format.WIDTH
#: Rows of ``x`` per register tile. ``ROW_TILE`` rows times two panels is 16 accumulators,
#: half of the 32 AVX-512 registers; and one panel's accumulators, ``ROW_TILE *
#: PANEL_WIDTH`` floats (512 bytes), stay below TVM's 1024-byte stack-allocation limit.
#: A larger buffer would go to the heap workspace, where LLVM cannot keep it in registers.
ROW_TILE = 8

_SUPPORTED_DTYPES = ("float32",)


def packed_dense_shape(k: int, n: int) -> tuple[int, int, int]:
    """The shape of the packed weight for a ``[k, n]`` weight.

    Args:
        k: reduction size (rows of ``W``).
        n: output size (columns of ``W``).

    Returns:
        ``(ceil(n / PANEL_WIDTH), k, PANEL_WIDTH)``.
    """
    return (-(-n // PANEL_WIDTH), k, PANEL_WIDTH)


def pack_dense_weight(weight: np.ndarray) -> np.ndarray:
    """Packs a ``[K, N]`` weight into the panel layout the kernel reads.

    Args:
        weight: the ``[K, N]`` float32 weight (``y = x @ weight``).

    Returns:
        A C-contiguous float32 array of shape ``packed_dense_shape(K, N)``, with the columns
        past ``N`` in the last panel set to zero.

    Raises:
        ValueError: if ``weight`` is not a 2-D float32 array.
    """
    (panels,) = formats.get("panels").encode(weight)
    return panels


def panel_store(n: int):
    """The TIR macro ``store(acc, y, p, m0, rows)`` that writes ``rows`` finished rows of
    panel ``p`` (``acc[r * PANEL_WIDTH + j]``) to ``y[m0 + r, p * PANEL_WIDTH + j]`` for an
    output of ``n`` columns: whole vectors, but only the real columns of the last panel, so
    its zero padding is never written. The dense and the quantized kernels share it."""
    from tvm.script import tirx as T

    width = PANEL_WIDTH
    full_panels, tail_cols = divmod(n, width)

    @T.macro
    def store(acc, y, p, m0, rows):
        if tail_cols == 0:
            for r in T.unroll(rows):
                for j in T.vectorized(width):
                    y[m0 + r, p * width + j] = acc[r * width + j]
        else:
            if p < full_panels:
                for r in T.unroll(rows):
                    for j in T.vectorized(width):
                        y[m0 + r, p * width + j] = acc[r * width + j]
            else:
                for r in range(rows):
                    for j in range(tail_cols):
                        y[m0 + r, p * width + j] = acc[r * width + j]

    return store


def dense_matmul_func(m: int, k: int, n: int, dtype: str = "float32"):
    """A TIR PrimFunc computing ``y = x @ W`` from the packed ``W``, specialised to one shape.

    The PrimFunc's parameters are ``x [m, k]``, ``w_packed`` of shape
    ``packed_dense_shape(k, n)`` (from ``pack_dense_weight``) and the output ``y [m, n]``,
    every element of which it writes. It carries ``tir.noalias`` and ``tirx.is_scheduled``,
    so it can be passed to ``relax.call_tir`` and the default schedules leave it alone. Its
    global symbol is ``dense_matmul_m{m}_k{k}_n{n}``.

    Args:
        m: rows of ``x`` (tokens); any positive value, tiled by ``ROW_TILE``.
        k: reduction size.
        n: output size; need not be a multiple of ``PANEL_WIDTH``.
        dtype: element type; only ``"float32"`` is supported.

    Returns:
        A ``tvm.tirx.PrimFunc``.

    Raises:
        ValueError: for an unsupported dtype or a non-positive size.
    """
    from tvm.script import tirx as T

    if dtype not in _SUPPORTED_DTYPES:
        raise ValueError(f"dense_matmul_func supports {_SUPPORTED_DTYPES}, not {dtype!r}")
    if min(m, k, n) <= 0:
        raise ValueError(f"sizes must be positive, got m={m}, k={k}, n={n}")

    width = PANEL_WIDTH
    panels = packed_dense_shape(k, n)[0]
    pairs, lone_panel = divmod(panels, 2)
    row_tiles, tail_rows = divmod(m, ROW_TILE)
    prefetch_rows = PREFETCH_BYTES // (width * np.dtype(dtype).itemsize)
    # The last prefetch_rows rows of a panel run without a prefetch rather than reach
    # past its end.
    prefetched_rows = max(k - prefetch_rows, 0)

    @T.macro
    def prefetch_panel(w, p, kk):
        T.evaluate(prefetch(T.address_of(w[p, kk + prefetch_rows, 0])))

    @T.macro
    def clear(acc, rows):
        # Row by row: one whole-buffer vector of, say, 48 lanes leads LLVM to split the
        # accumulators into scalars instead of registers.
        for r in T.unroll(rows):
            for j in T.vectorized(width):
                acc[r * width + j] = T.cast(0, dtype)

    @T.macro
    def accumulate(acc, x, w, p, m0, kk, rows):
        for r in T.unroll(rows):
            for j in T.vectorized(width):
                acc[r * width + j] = acc[r * width + j] + x[m0 + r, kk] * w[p, kk, j]

    store = panel_store(n)

    @T.macro
    def row_tile(x, w, y, p, m0, rows, pair):
        # y[m0:m0+rows] for panel p, and panel p + 1 too when `pair`. One buffer per panel
        # keeps each under the stack limit; the default ("global") scope is deliberate,
        # as TVM 0.27 sends every "local" buffer to the heap workspace whatever its size.
        first = T.alloc_buffer((rows * width,), dtype)
        clear(first, rows)
        if pair:
            second = T.alloc_buffer((rows * width,), dtype)
            clear(second, rows)
        if prefetched_rows > 0:
            for kk in range(prefetched_rows):
                prefetch_panel(w, p, kk)
                accumulate(first, x, w, p, m0, kk, rows)
                if pair:
                    prefetch_panel(w, p + 1, kk)
                    accumulate(second, x, w, p + 1, m0, kk, rows)
        for kk in range(prefetched_rows, k):
            accumulate(first, x, w, p, m0, kk, rows)
            if pair:
                accumulate(second, x, w, p + 1, m0, kk, rows)
        store(first, y, p, m0, rows)
        if pair:
            store(second, y, p + 1, m0, rows)

    # The `if` on Python ints around loops (here and in row_tile) drop loops that would run
    # zero times; TVM would otherwise keep their buffer allocations.
    @T.macro
    def column_task(x, w, y, p, pair):
        if row_tiles > 0:
            for t in range(row_tiles):
                row_tile(x, w, y, p, t * ROW_TILE, ROW_TILE, pair)
        if tail_rows > 0:
            row_tile(x, w, y, p, row_tiles * ROW_TILE, tail_rows, pair)

    @T.prim_func
    def dense_matmul(
        x: T.Buffer((m, k), dtype),
        w: T.Buffer((panels, k, width), dtype),
        y: T.Buffer((m, n), dtype),
    ):
        T.func_attr(func_attrs(formats.symbol("panels", "cpu", "matmul", m, k, n)))
        for task in T.parallel(pairs + lone_panel):
            if lone_panel == 0:
                column_task(x, w, y, task * 2, True)
            else:
                if task < pairs:
                    column_task(x, w, y, task * 2, True)
                else:
                    column_task(x, w, y, task * 2, False)

    return dense_matmul
