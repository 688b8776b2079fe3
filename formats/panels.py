"""``panels``: the CPU dense kernel's layout, ``W`` cut into column panels of 16.

::

    panels[p, k, j] = W[k, 16 p + j]        (zero where 16 p + j >= N)
    panels.shape    = (ceil(N / 16), K, 16)  float32

Each panel, 16 columns of ``W``, is one contiguous run of ``16 K`` floats: one 64-byte
cache line (one AVX-512 vector) per ``k``, which ``targets.cpu.kernels.dense_matmul_func``
streams once per tile of rows.
"""

from __future__ import annotations

import numpy as np

from formats.base import ArraySpec, Format, Kernel, ceil_div, check_weight

#: Columns per panel: one 512-bit vector of fp32, so one row of a panel is one cache line.
WIDTH = 16


class Panels(Format):
    def layout(self, k, n, nnz=None, block=None):
        return (ArraySpec("panels", np.dtype(self.value_dtype), (ceil_div(n, WIDTH), k, WIDTH)),)

    def encode(self, weight, block=None):
        check_weight(weight)
        k, n = weight.shape
        panels = ceil_div(n, WIDTH)
        padded = np.zeros((k, panels * WIDTH), dtype=np.float32)
        padded[:, :n] = weight
        return [np.ascontiguousarray(padded.reshape(k, panels, WIDTH).transpose(1, 0, 2))]

    def decode(self, arrays, shape, block=None):
        k, n = shape
        return np.ascontiguousarray(arrays[0].transpose(1, 0, 2).reshape(k, -1)[:, :n])

    def stored(self, shapes):
        return None

    def multiply_adds(self, k, n, nnz=None, block=None):
        return k * n


FORMAT = Panels(
    name="panels",
    summary="the CPU dense kernel's column panels of 16 ([ceil(N / 16), K, 16])",
    arrays=("panels",),
    kernels=(Kernel("cpu", "matmul", "dense_matmul", ("m", "k", "n")),),
)
