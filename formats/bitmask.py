"""``bitmask``: ``W^T`` ([N, K]) by output row, one bit per entry and the nonzeros.

::

    bits         uint8 [N, ceil(K / 8)]  bit b of bits[i, j] says whether W^T[i, 8 j + b] != 0
    row_offsets  int32 [N + 1]           row i's nonzeros are row_offsets[i] .. row_offsets[i + 1]
    values       float32 [nnz]           in row-major order of W^T

    y[m, i] = sum_k bit(i, k) * values[row_offsets[i] + rank(i, k)] * x[m, k]

``N ceil(K / 8) + 4 nnz + 4 (N + 1)`` bytes: 4.25 bytes per pair of weights at 50 %, where
csr needs 6. ``pack_rows`` / ``unpack_rows`` are the same layout over the rows of any
matrix (``bitmask_rows`` applies it to ``W`` itself).
"""

from __future__ import annotations

import numpy as np

from formats.base import ArraySpec, Format, Kernel, ceil_div

REFERENCE = """
    zero = Constant <value_ints: ints = [0]> ()
    one = Constant <value_ints: ints = [1]> ()
    two = Constant <value_ints: ints = [2]> ()
    kn = Constant <value_ints: ints = @shape> ()
    k = Slice (kn, zero, one)
    n = Slice (kn, one, two)
    shifts = Constant <value: tensor = uint8[8] {0, 1, 2, 3, 4, 5, 6, 7}> ()
    low_bit = Constant <value: tensor = uint8 {1}> ()
    bytes3 = Unsqueeze (bits, two)
    shifted = BitShift <direction: string = "RIGHT"> (bytes3, shifts)
    bit_values = BitwiseAnd (shifted, low_bit)
    minus_one = Constant <value_ints: ints = [-1]> ()
    flat_shape = Concat <axis: int = 0> (n, minus_one)
    flat = Reshape (bit_values, flat_shape)
    trimmed = Slice (flat, zero, k, one)
    mask = Cast <to: int = 9> (trimmed)
    nonzero = NonZero (mask)
    positions = Transpose <perm: ints = [1, 0]> (nonzero)
    nk = Concat <axis: int = 0> (n, k)
    zeros = ConstantOfShape <value: tensor = float[1] {0}> (nk)
    weight_t = ScatterND (zeros, positions, values)
    weight = Transpose <perm: ints = [1, 0]> (weight_t)
    y = MatMul ($X, weight)
"""


def row_layout(rows: int, cols: int, nnz: int, value_dtype: str) -> tuple[ArraySpec, ...]:
    """The arrays of ``pack_rows`` for a [rows, cols] matrix with ``nnz`` nonzeros."""
    return (ArraySpec("bits", np.dtype(np.uint8), (rows, ceil_div(cols, 8))),
            ArraySpec("row_offsets", np.dtype(np.int32), (rows + 1,)),
            ArraySpec("values", np.dtype(value_dtype), (nnz,)))


def pack_rows(matrix: np.ndarray) -> list[np.ndarray]:
    """Each row of ``matrix`` as a bitmask (little-endian bits per byte) and its nonzeros."""
    mask = matrix != 0
    bits = np.packbits(mask, axis=1, bitorder="little")
    row_offsets = np.zeros(matrix.shape[0] + 1, dtype=np.int32)
    np.cumsum(mask.sum(axis=1), out=row_offsets[1:])
    return [bits, row_offsets, matrix[mask].astype(matrix.dtype)]


def unpack_rows(arrays: list[np.ndarray], rows: int, cols: int) -> np.ndarray:
    """The [rows, cols] matrix of ``pack_rows``'s arrays."""
    bits, _, values = arrays
    mask = np.unpackbits(bits, axis=1, count=cols, bitorder="little").astype(bool)
    matrix = np.zeros((rows, cols), dtype=values.dtype)
    matrix[mask] = values
    return matrix


class Bitmask(Format):
    def layout(self, k, n, nnz, block=None):
        return row_layout(n, k, nnz, self.value_dtype)

    def encode(self, weight, block=None):
        return pack_rows(np.ascontiguousarray(weight.T))

    def decode(self, arrays, shape, block=None):
        k, n = shape
        return unpack_rows(arrays, n, k).T.copy()


FORMAT = Bitmask(
    name="bitmask",
    summary="W^T by output row: one bit per entry, row offsets, the nonzeros",
    arrays=("bits", "row_offsets", "values"),
    kernels=(
        Kernel("cpu", "matmul", "bitmask_matmul", ("m", "k", "n", "nnz")),
        Kernel("cpu", "gather", "bitmask_gather", ("rows", "k", "n", "nnz", "ids")),
    ),
    reference=REFERENCE,
)
