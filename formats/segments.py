"""``segments``: ``W`` ([K, N]) by input row as windows of 16 consecutive columns that hold
all its nonzeros, for block-pruned weights behind an activation gate.

::

    row_offsets  int32 [K + 1]           row k's windows are row_offsets[k] .. row_offsets[k + 1]
    starts       int32 [S]               window s covers columns starts[s] .. starts[s] + 16
    values       float32 [16 S]          window s's values, zeros inside it included

Row ``k`` is covered left to right: a window starts at the first nonzero not yet covered
and holds the row's 16 values there; at the end of the row it is moved left to
``N - 16``, with zeros in the lanes the window before it holds. A weight pruned in
``16x1`` blocks of ``W^T`` is exactly one window per block, and
``targets.cpu.sparse_kernels.segment_matmul_func`` does one 16-lane multiply-add per
window of an active row; an unstructured weight is nearly dense here, and
``bitmask_rows`` is then the smaller layout (``targets.legalize`` keeps whichever is
fewer bytes). The stored count is ``16 S``; ``a`` active rows with ``nnz`` values in their
windows read ``4 nnz + nnz / 4 + 4 (a + 1)`` bytes.
"""

from __future__ import annotations

import numpy as np

from formats.base import ArraySpec, Format, Kernel

#: Columns per window: one AVX-512 vector of fp32.
WIDTH = 16


class Segments(Format):
    def layout(self, k, n, nnz, block=None):
        return (ArraySpec("row_offsets", np.dtype(np.int32), (k + 1,)), ArraySpec("starts", np.dtype(np.int32), (nnz // WIDTH,)),
                ArraySpec("values", np.dtype(self.value_dtype), (nnz,)))

    def encode(self, weight, block=None):
        """Raises ValueError unless ``weight`` is 2-D float32 with at least 16 columns."""
        if weight.ndim != 2 or weight.dtype != np.float32 or weight.shape[1] < WIDTH:
            raise ValueError(f"expected a 2-D float32 weight of at least {WIDTH} columns, "
                             f"got {weight.ndim}-D {weight.dtype} {weight.shape}")
        k, n = weight.shape
        offsets, starts, owned = [0], [], []
        for row in weight != 0:
            columns = np.flatnonzero(row)
            position, covered = 0, 0
            while position < columns.size:
                start = min(int(columns[position]), n - WIDTH)
                starts.append(start)
                owned.append(covered - start)  # lanes below this belong to the window before
                covered = start + WIDTH
                position = int(np.searchsorted(columns, covered))
            offsets.append(len(starts))
        starts_array = np.asarray(starts, np.int32)
        lanes = np.arange(WIDTH, dtype=np.int32)
        rows = np.repeat(np.arange(k), np.diff(offsets))
        values = weight[rows[:, None], starts_array[:, None] + lanes]
        values[lanes[None, :] < np.asarray(owned, np.int32)[:, None]] = 0
        return [np.asarray(offsets, np.int32), starts_array, np.ascontiguousarray(values, np.float32).reshape(-1)]

    def decode(self, arrays, shape, block=None):
        k, n = shape
        offsets, starts, values = arrays
        weight = np.zeros((k, n), np.float32)
        rows = np.repeat(np.arange(k), np.diff(offsets))
        # A window moved left at the end of a row overlaps the one before it, with zeros there.
        np.add.at(weight, (rows[:, None], starts[:, None] + np.arange(WIDTH)), values.reshape(-1, WIDTH))
        return weight


FORMAT = Segments(
    name="segments",
    summary="W by input row as windows of 16 columns (CPU dual-sparse kernel for block-pruned weights)",
    arrays=("row_offsets", "starts", "values"),
    kernels=(Kernel("cpu", "gated", "dual_matmul", ("m", "k", "n", "nnz", "gate", "seg")),),
    skips_rows=True,
)
