"""``dense``: the weight as it is, ``weight`` float32 [K, N], row-major.

The layout of ONNX's own ``MatMul``, of ``SparseMatMul[dense]`` / ``GatedMatMul[*_dense]``
and of the gated kernels, which skip the row ``k`` of every inactive input (one
contiguous run of ``N`` values), so with ``a`` active inputs they read ``4 a N`` bytes.
It is the cost model's baseline: ``4 K N`` bytes.
"""

from __future__ import annotations

import numpy as np

from formats.base import ArraySpec, Format, Kernel

REFERENCE = "y = MatMul ($X, weight)"


class Dense(Format):
    def layout(self, k, n, nnz=None, block=None):
        return (ArraySpec("weight", np.dtype(self.value_dtype), (k, n)),)

    def encode(self, weight, block=None):
        return [np.ascontiguousarray(weight)]

    def decode(self, arrays, shape, block=None):
        return arrays[0].copy()

    def stored(self, shapes):
        return None

    def multiply_adds(self, k, n, nnz=None, block=None):
        return k * n


FORMAT = Dense(
    name="dense",
    summary="the [K, N] weight as it is (ONNX's layout; the gated kernels skip its inactive rows)",
    arrays=("weight",),
    kernels=(
        Kernel("cpu", "gated", "gated_matmul", ("m", "k", "n", "gate")),
        Kernel("cuda", "gated", "cuda_gated_matmul", ("m", "k", "n", "gate")),
    ),
    reference=REFERENCE,
    skips_rows=True,
)
