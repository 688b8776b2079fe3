"""``bitmask_rows``: the CPU dual-sparse kernel's layout, ``W`` ([K, N]) by input row as a
bitmask over ``N`` and the nonzeros.

::

    bits         uint8 [K, ceil(N / 8)]  bit b of bits[k, j] says whether W[k, 8 j + b] != 0
    row_offsets  int32 [K + 1]           row k's nonzeros are row_offsets[k] .. row_offsets[k + 1]
    values       float32 [nnz]           in row-major order of W

This is ``bitmask`` applied to ``W`` rather than ``W^T``, so that row ``k``, everything
an input ``k`` touches, is contiguous: ``targets.cpu.sparse_kernels.dual_matmul_func``
skips the rows of inactive inputs and expands an active row's values 16 columns at a time.
With ``a`` active rows holding ``nnz`` values it reads ``a ceil(N / 8) + 4 nnz + 4 (a + 1)``
bytes.
"""

from __future__ import annotations

from formats.base import Format, Kernel, check_weight
from formats.bitmask import pack_rows, row_layout, unpack_rows


class BitmaskRows(Format):
    def layout(self, k, n, nnz, block=None):
        return row_layout(k, n, nnz, self.value_dtype)

    def encode(self, weight, block=None):
        check_weight(weight)
        return pack_rows(weight)

    def decode(self, arrays, shape, block=None):
        return unpack_rows(arrays, *shape)


FORMAT = BitmaskRows(
    name="bitmask_rows",
    summary="W by input row (CPU dual-sparse kernel): one bit per entry over N, row offsets, the nonzeros",
    arrays=("bits", "row_offsets", "values"),
    kernels=(Kernel("cpu", "gated", "dual_matmul", ("m", "k", "n", "nnz", "gate")),),
    skips_rows=True,
)
