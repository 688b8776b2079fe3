"""Dense fp32 matmul kernels for the CPU, written directly in low-level TIR.

The kernel computes ``y[M, N] = x[M, K] @ W[K, N]`` where ``W`` is a constant weight
that is packed once, ahead of time, into column panels::

    Wp[p, k, j] = W[k, p * PANEL_WIDTH + j]        (zero where p * PANEL_WIDTH + j >= N)
    Wp.shape    = (ceil(N / PANEL_WIDTH), K, PANEL_WIDTH)

so each panel, the ``PANEL_WIDTH`` columns one task owns, is one contiguous stream of
``K * PANEL_WIDTH`` floats. The kernel runs the panels in parallel; inside a panel it walks
``x`` in tiles of ``ROW_TILE`` rows, keeps a ``ROW_TILE x PANEL_WIDTH`` block of ``y`` in
vector registers, and streams the panel once per row tile, doing one broadcast-FMA per
row and ``k``. At decode (``M = 1``) the kernel is bound by the bandwidth of reading ``W``
and the panel stream is what the hardware prefetchers like best; at prefill the panel
(``K * 64`` bytes) stays in L2 while every row tile reuses it.

The output is ``y[M, N]``: the zero padding of the last panel is never written out.
"""

from __future__ import annotations

import numpy as np

#: Columns per panel: one 512-bit vector of fp32, so a row of a panel is one zmm load.
PANEL_WIDTH = 16
#: Rows of ``x`` whose accumulators live in registers at once. ``ROW_TILE * PANEL_WIDTH``
#: floats must stay under TVM's 1024-byte stack-allocation limit: above it the buffer
#: becomes a heap workspace and LLVM can no longer keep it in registers.
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
    if weight.ndim != 2 or weight.dtype != np.float32:
        raise ValueError(
            f"expected a 2-D float32 weight, got {weight.ndim}-D {weight.dtype}"
        )
    k, n = weight.shape
    panels, _, width = packed_dense_shape(k, n)
    padded = np.zeros((k, panels * width), dtype=np.float32)
    padded[:, :n] = weight
    return np.ascontiguousarray(padded.reshape(k, panels, width).transpose(1, 0, 2))


def dense_matmul_func(m: int, k: int, n: int, dtype: str = "float32"):
    """A TIR PrimFunc computing ``y = x @ W`` from the packed ``W``, specialised to one shape.

    The PrimFunc has parameters ``(x [m, k], w_packed packed_dense_shape(k, n), y [m, n])``,
    writes all of ``y`` (only the valid ``n`` columns exist) and carries the attributes
    ``tir.noalias`` and ``tirx.is_scheduled``, so that it can be passed to
    ``relax.call_tir`` and the default schedules leave it alone. Its global symbol is
    ``dense_matmul_m{m}_k{k}_n{n}``.

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
    full_panels = n // width
    tail_cols = n - full_panels * width
    row_tiles, tail_rows = divmod(m, ROW_TILE)

    @T.macro
    def row_tile(x, w, y, p, m0, rows):
        # "global" scope, not "local": TVM 0.27 puts every "local" buffer on the heap
        # workspace, which keeps LLVM from promoting the accumulators to registers.
        acc = T.alloc_buffer((rows * width,), dtype, scope="global")
        for t in T.vectorized(rows * width):
            acc[t] = T.cast(0, dtype)
        for kk in range(k):
            for r in T.unroll(rows):
                for j in T.vectorized(width):
                    acc[r * width + j] = acc[r * width + j] + x[m0 + r, kk] * w[p, kk, j]
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

    @T.prim_func
    def dense_matmul(
        x: T.Buffer((m, k), dtype),
        w: T.Buffer((panels, k, width), dtype),
        y: T.Buffer((m, n), dtype),
    ):
        T.func_attr(
            {
                "global_symbol": f"dense_matmul_m{m}_k{k}_n{n}",
                "tir.noalias": True,
                "tirx.is_scheduled": True,
            }
        )
        for p in T.parallel(panels):
            if row_tiles > 0:
                for t in range(row_tiles):
                    row_tile(x, w, y, p, t * ROW_TILE, ROW_TILE)
            if tail_rows > 0:
                row_tile(x, w, y, p, row_tiles * ROW_TILE, tail_rows)

    return dense_matmul
