"""``csr``: ``W^T`` ([N, K]) by output row, compressed sparse rows.

::

    indptr   int32 [N + 1]               row i's nonzeros are indptr[i] .. indptr[i + 1]
    indices  int16 | int32 [nnz]         the k of each nonzero (int16 when K < 32768)
    values   float32 [nnz]               in row-major order of W^T

    y[m, i] = sum_{j in [indptr[i], indptr[i+1])} values[j] * x[m, indices[j]]

``nnz (4 + index bytes) + 4 (N + 1)`` bytes: 6 per nonzero with int16 indices, so it
beats dense from about a third of nonzeros down.
"""

from __future__ import annotations

import numpy as np

from formats.base import ROW_IDS, ArraySpec, Format, Kernel, index_dtype

REFERENCE = ROW_IDS.replace("$ENTRIES", "values") + """
    cols = Cast <to: int = 7> (indices)
    cols2 = Unsqueeze (cols, one)
    rows2 = Unsqueeze (rows, one)
    coords = Concat <axis: int = 1> (cols2, rows2)
    kn = Constant <value_ints: ints = @shape> ()
    zeros = ConstantOfShape <value: tensor = float[1] {0}> (kn)
    weight = ScatterND (zeros, coords, values)
    y = MatMul ($X, weight)
"""


class Csr(Format):
    def layout(self, k, n, nnz, block=None):
        return (ArraySpec("indptr", np.dtype(np.int32), (n + 1,)), ArraySpec("indices", index_dtype(k), (nnz,)),
                ArraySpec("values", np.dtype(self.value_dtype), (nnz,)))

    def encode(self, weight, block=None):
        k, n = weight.shape
        weight_t = np.ascontiguousarray(weight.T)
        rows, cols = np.nonzero(weight_t)
        indptr = np.zeros(n + 1, dtype=np.int32)
        np.cumsum(np.bincount(rows, minlength=n), out=indptr[1:])
        return [indptr, cols.astype(index_dtype(k)), weight_t[rows, cols].astype(weight.dtype)]

    def decode(self, arrays, shape, block=None):
        k, n = shape
        indptr, indices, values = arrays
        weight_t = np.zeros((n, k), dtype=values.dtype)
        rows = np.repeat(np.arange(n), np.diff(indptr))
        weight_t[rows, indices.astype(np.int64)] = values
        return weight_t.T.copy()


FORMAT = Csr(
    name="csr",
    summary="W^T by output row: row pointers, int16/int32 column indices, values",
    arrays=("indptr", "indices", "values"),
    kernels=(
        Kernel("cpu", "matmul", "csr_matmul", ("m", "k", "n", "nnz", "index")),
        Kernel("cpu", "gather", "csr_gather", ("rows", "k", "n", "nnz", "index", "ids")),
        Kernel("cuda", "matmul", "cuda_csr_matmul", ("m", "k", "n", "nnz", "index")),
    ),
    reference=REFERENCE,
)
