"""``bitmask_words``: the CUDA dual-sparse kernel's layout, ``W`` ([K, N]) by input row in
32-column words, each a bitmask and an offset into the nonzeros.

::

    bits     uint32 [K, ceil(N / 32)]    bit l of bits[k, j] set  <=>  W[k, 32 j + l] != 0
    offsets  int32 [K, ceil(N / 32)]     where the nonzeros of word (k, j) start in values
    values   float32 [nnz]               W's nonzeros in row-major order

    W[k, 32 j + l] = values[offsets[k, j] + popcount(bits[k, j] & (2^l - 1))]  (if set)

A word is one warp's tile of columns: lane ``l`` loads its value when bit ``l`` is set, and
an active row's nonzeros within a tile are one contiguous run, read coalesced
(``targets.cuda.sparse_kernels.dual_matmul_func``). With ``a`` active rows holding ``nnz``
values it reads ``8 a ceil(N / 32) + 4 nnz`` bytes: 0.25 bytes per weight plus 4 per
nonzero.
"""

from __future__ import annotations

import numpy as np

from formats.base import ArraySpec, Format, Kernel, ceil_div, check_weight

#: Columns per word: the threads of a warp.
WORD = 32


class BitmaskWords(Format):
    def layout(self, k, n, nnz, block=None):
        words = ceil_div(n, WORD)
        return (ArraySpec("bits", np.dtype(np.uint32), (k, words)), ArraySpec("offsets", np.dtype(np.int32), (k, words)),
                ArraySpec("values", np.dtype(self.value_dtype), (nnz,)))

    def encode(self, weight, block=None):
        check_weight(weight)
        k, n = weight.shape
        words = ceil_div(n, WORD)
        mask = np.zeros((k, words * WORD), dtype=bool)
        mask[:, :n] = weight != 0
        lanes = mask.reshape(k, words, WORD)
        bits = (lanes.astype(np.uint64) << np.arange(WORD, dtype=np.uint64)).sum(axis=2)
        counts = lanes.sum(axis=2).reshape(-1)
        offsets = np.zeros(k * words, dtype=np.int64)
        np.cumsum(counts[:-1], out=offsets[1:])
        return [bits.astype(np.uint32), offsets.reshape(k, words).astype(np.int32), np.ascontiguousarray(weight[weight != 0])]

    def decode(self, arrays, shape, block=None):
        k, n = shape
        bits, _, values = arrays
        words = bits.shape[1]
        mask = ((bits[:, :, None].astype(np.uint64) >> np.arange(WORD, dtype=np.uint64)) & 1).astype(bool)
        mask = mask.reshape(k, words * WORD)[:, :n]
        weight = np.zeros((k, n), dtype=values.dtype)
        weight[mask] = values
        return weight


FORMAT = BitmaskWords(
    name="bitmask_words",
    summary="W by input row in 32-column words (CUDA dual-sparse kernel): bits and an offset per word, the nonzeros",
    arrays=("bits", "offsets", "values"),
    kernels=(Kernel("cuda", "gated", "cuda_dual_matmul", ("m", "k", "n", "nnz", "gate")),),
    skips_rows=True,
)
