"""``bsr``: ``W^T`` zero-padded to whole ``R x C`` blocks, by block row.

::

    indptr   int32 [ceil(N / R) + 1]     block row ib's blocks are indptr[ib] .. indptr[ib + 1]
    indices  int16 | int32 [nnzb]        the block column (k // C) of each block
    values   float32 [nnzb, R, C]

    y[m, ib*R + r] = sum_{b in [indptr[ib], indptr[ib+1])} sum_c
                         values[b, r, c] * x[m, indices[b]*C + c]

``R`` groups outputs and ``C`` inputs: a ``16x1`` block is 16 outputs that read one input,
a contiguous 64-byte run of ``W``'s row. ``nnzb (4 R C + index bytes) + 4 (ceil(N / R) + 1)``
bytes; the stored count is ``nnzb``, the blocks.
"""

from __future__ import annotations

import numpy as np

from formats.base import ROW_IDS, ArraySpec, Format, Kernel, ceil_div, index_dtype

REFERENCE = ROW_IDS.replace("$ENTRIES", "indices") + """
    bcols = Cast <to: int = 7> (indices)
    rows2 = Unsqueeze (rows, one)
    bcols2 = Unsqueeze (bcols, one)
    coords = Concat <axis: int = 1> (rows2, bcols2)
    kn = Constant <value_ints: ints = @shape> ()
    rc = Constant <value_ints: ints = @block> ()
    two = Constant <value_ints: ints = [2]> ()
    k = Slice (kn, zero, one)
    n = Slice (kn, one, two)
    r = Slice (rc, zero, one)
    c = Slice (rc, one, two)
    indptr_size = Shape (indptr)
    block_rows = Sub (indptr_size, one)
    k_plus_c = Add (k, c)
    k_round = Sub (k_plus_c, one)
    block_cols = Div (k_round, c)
    tiles_shape = Concat <axis: int = 0> (block_rows, block_cols, r, c)
    tiles_zero = ConstantOfShape <value: tensor = float[1] {0}> (tiles_shape)
    tiles = ScatterND (tiles_zero, coords, values)
    rows_first = Transpose <perm: ints = [0, 2, 1, 3]> (tiles)
    padded_rows = Mul (block_rows, r)
    padded_cols = Mul (block_cols, c)
    padded_shape = Concat <axis: int = 0> (padded_rows, padded_cols)
    padded = Reshape (rows_first, padded_shape)
    origin = Concat <axis: int = 0> (zero, zero)
    extent = Concat <axis: int = 0> (n, k)
    weight_t = Slice (padded, origin, extent)
    weight = Transpose <perm: ints = [1, 0]> (weight_t)
    y = MatMul ($X, weight)
"""


def _need_block(block):
    if block is None:
        raise ValueError("bsr needs a block shape")
    return block


class Bsr(Format):
    def layout(self, k, n, nnz, block=None):
        rows, cols = _need_block(block)
        return (ArraySpec("indptr", np.dtype(np.int32), (ceil_div(n, rows) + 1,)),
                ArraySpec("indices", index_dtype(ceil_div(k, cols)), (nnz,)),
                ArraySpec("values", np.dtype(self.value_dtype), (nnz, rows, cols)))

    def encode(self, weight, block=None):
        r, c = _need_block(block)
        k, n = weight.shape
        padded = np.zeros((ceil_div(n, r) * r, ceil_div(k, c) * c), dtype=weight.dtype)
        padded[:n, :k] = weight.T
        tiles = padded.reshape(padded.shape[0] // r, r, padded.shape[1] // c, c).transpose(0, 2, 1, 3)
        present = tiles.any(axis=(2, 3))
        block_rows, block_cols = np.nonzero(present)
        indptr = np.zeros(padded.shape[0] // r + 1, dtype=np.int32)
        np.cumsum(np.bincount(block_rows, minlength=padded.shape[0] // r), out=indptr[1:])
        values = np.ascontiguousarray(tiles[block_rows, block_cols])
        return [indptr, block_cols.astype(index_dtype(padded.shape[1] // c)), values.reshape(-1, r, c)]

    def decode(self, arrays, shape, block=None):
        r, c = _need_block(block)
        k, n = shape
        indptr, indices, values = arrays
        block_rows = np.repeat(np.arange(len(indptr) - 1), np.diff(indptr))
        padded = np.zeros((len(indptr) - 1, ceil_div(k, c), r, c), dtype=values.dtype)
        padded[block_rows, indices.astype(np.int64)] = values
        weight_t = padded.transpose(0, 2, 1, 3).reshape((len(indptr) - 1) * r, -1)
        return weight_t[:n, :k].T.copy()

    def stored(self, shapes):
        return int(shapes[1][0])

    def multiply_adds(self, k, n, nnz, block=None):
        rows, cols = _need_block(block)
        return nnz * rows * cols


FORMAT = Bsr(
    name="bsr",
    summary="W^T in R x C blocks by block row: block-row pointers, block-column indices, blocks",
    arrays=("indptr", "indices", "values"),
    kernels=(
        Kernel("cpu", "matmul", "bsr_matmul", ("m", "k", "n", "block", "nnzb", "index")),
        Kernel("cuda", "matmul", "cuda_bsr_matmul", ("m", "k", "n", "block", "nnzb", "index")),
    ),
    reference=REFERENCE,
    takes_block=True,
)
