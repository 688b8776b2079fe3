"""Sparse weight formats and the bytes-moved cost model that chooses between them.

A weight ``W`` of shape [K, N] is used as ``y = x @ W``. Sparse formats store its transpose
by output row (``N`` rows of length ``K``), so a kernel computes each output from one row:

- ``dense``: ``4 K N`` bytes (fp32).
- ``csr``: values plus one column index per nonzero (int16 when ``K < 32768``, else int32)
  plus ``N + 1`` int32 row pointers.
- ``bsr RxC``: each stored block holds ``R x C`` values and one index; ``N / R + 1`` pointers.
- ``bitmask``: one bit per element (rows padded to whole bytes), the nonzero values, and
  ``N + 1`` int32 row offsets into the values.

At batch 1 a matmul is memory-bound, so the predicted speedup over dense is
``bytes(dense) / bytes(format)``; the format with the fewest bytes wins.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

VALUE_BYTES = 4
POINTER_BYTES = 4

# Block shapes tried when looking for structure, as (rows of W^T, columns of W^T):
# rows group outputs, columns group inputs.
BLOCK_SHAPES = ((1, 4), (1, 8), (1, 16), (4, 1), (8, 1), (16, 1), (2, 2), (4, 4), (8, 8), (16, 16))

# Structure counts as "block" when nearly all zeros sit in whole zero blocks.
BLOCK_STRUCTURE_TOLERANCE = 0.01


def index_bytes(extent: int) -> int:
    """Bytes per index for indices in ``[0, extent)``: the smallest width that fits."""
    return 2 if extent < 32768 else 4


def dense_bytes(k: int, n: int) -> int:
    return VALUE_BYTES * k * n


def csr_bytes(k: int, n: int, nnz: int) -> int:
    return nnz * (VALUE_BYTES + index_bytes(k)) + (n + 1) * POINTER_BYTES


def bsr_bytes(k: int, n: int, block: tuple[int, int], nonzero_blocks: int) -> int:
    rows, cols = block
    return nonzero_blocks * (rows * cols * VALUE_BYTES + index_bytes(-(-k // cols))) + (-(-n // rows) + 1) * POINTER_BYTES


def bitmask_bytes(k: int, n: int, nnz: int) -> int:
    return n * ((k + 7) // 8) + nnz * VALUE_BYTES + (n + 1) * POINTER_BYTES


def nonzero_blocks(weight_t: np.ndarray, block: tuple[int, int]) -> int | None:
    """Number of blocks of ``weight_t`` ([N, K]) holding a nonzero, or None if it does not tile."""
    rows, cols = block
    n, k = weight_t.shape
    if n % rows or k % cols:
        return None
    tiles = (weight_t != 0).reshape(n // rows, rows, k // cols, cols)
    return int(tiles.any(axis=(1, 3)).sum())


@dataclass(frozen=True)
class FormatChoice:
    """The cheapest format for one weight and what the alternatives cost."""

    format: str
    block: tuple[int, int] | None
    bytes: int
    dense_bytes: int
    candidates: dict[str, int]

    @property
    def predicted_speedup(self) -> float:
        return self.dense_bytes / self.bytes


# Bytes per second each kernel streams relative to the dense kernel (1.0 = as fast per byte).
# Gathers and bit expansion cost instructions that the dense kernel does not spend, so a
# format must save more bytes than its inefficiency costs. Measured speedup over our dense
# kernel divided by the bytes ratio, batch 1, weights from DRAM (`sparsecc bench kernels`,
# 2048x5632 and 1536x576 on the development machine): csr 0.88-0.94, bsr16x1 0.80-0.99,
# bitmask 0.79 at 50-70 % (0.56 at 90 %), dual 0.83 against the gated dense kernel.
KERNEL_EFFICIENCY = {"dense": 1.0, "csr": 0.9, "bsr": 0.9, "bitmask": 0.75, "dual": 0.8}

# A sparse kernel replaces the dense one only when predicted at least this much faster;
# below it the prediction is within the noise of the measurements behind it.
MIN_PREDICTED_SPEEDUP = 1.1


@dataclass(frozen=True)
class Decision:
    """What ``dense_to_sparse`` does with one weight, and why."""

    format: str
    block: tuple[int, int] | None
    predicted_speedup: float
    candidates: dict[str, float]  # format name -> predicted speedup over dense
    reason: str


def decide(weight: np.ndarray) -> Decision:
    """Chooses the format predicted fastest at batch 1 (bytes moved / kernel efficiency)."""
    choice = choose_format(weight)
    predicted = {
        name: choice.dense_bytes / size * KERNEL_EFFICIENCY["bsr" if name.startswith("bsr") else name]
        for name, size in choice.candidates.items()
    }
    best = max(predicted, key=predicted.get)
    listing = ", ".join(f"{name} {speed:.2f}x" for name, speed in sorted(predicted.items(), key=lambda kv: -kv[1]))
    if best == "dense" or predicted[best] < MIN_PREDICTED_SPEEDUP:
        return Decision("dense", None, 1.0, predicted,
                        f"kept dense: best sparse prediction {max((v for n, v in predicted.items() if n != 'dense'), default=0):.2f}x "
                        f"< {MIN_PREDICTED_SPEEDUP}x ({listing})")
    block = None
    if best.startswith("bsr"):
        block = tuple(int(v) for v in best[3:].split("x"))
    return Decision("bsr" if block else best, block, predicted[best], predicted, f"{best}: predicted {predicted[best]:.2f}x ({listing})")


def decide_gated(weight: np.ndarray) -> Decision:
    """Dense or dual-sparse storage for a weight behind an activation gate.

    Both kernels skip the rows of inactive inputs, so activation sparsity scales them
    alike; what differs is the bytes of each active row: ``4 N`` dense, or ``N / 8`` bits
    plus 4 bytes per nonzero for the dual kernel's row bitmask.
    """
    k, n = weight.shape
    nnz = int(np.count_nonzero(weight))
    dual_bytes = k * ((n + 7) // 8) + nnz * VALUE_BYTES + (k + 1) * POINTER_BYTES
    predicted = {"dense": 1.0, "dual": dense_bytes(k, n) / dual_bytes * KERNEL_EFFICIENCY["dual"]}
    listing = f"dual {predicted['dual']:.2f}x"
    if predicted["dual"] < MIN_PREDICTED_SPEEDUP:
        return Decision("dense", None, 1.0, predicted, f"gated dense: dual-sparse predicted {listing} < {MIN_PREDICTED_SPEEDUP}x")
    return Decision("bitmask", None, predicted["dual"], predicted, f"dual-sparse: predicted {listing} over gated dense")


def block_structure(weight_t: np.ndarray) -> tuple[tuple[int, int] | None, int | None]:
    """The largest block shape whose zero blocks hold nearly all zeros, and its block count."""
    total = weight_t.size
    sparsity = 1.0 - np.count_nonzero(weight_t) / total if total else 0.0
    if sparsity == 0.0:
        return None, None
    best, best_count = None, None
    for block in BLOCK_SHAPES:
        count = nonzero_blocks(weight_t, block)
        if count is None:
            continue
        block_area = block[0] * block[1]
        zero_block_fraction = 1.0 - count * block_area / total
        if zero_block_fraction >= sparsity - BLOCK_STRUCTURE_TOLERANCE:
            if best is None or block_area > best[0] * best[1]:
                best, best_count = block, count
    return best, best_count


def choose_format(weight: np.ndarray) -> FormatChoice:
    """Picks the format with the fewest bytes for a [K, N] weight."""
    k, n = weight.shape
    weight_t = weight.T
    nnz = int(np.count_nonzero(weight))
    candidates = {
        "dense": dense_bytes(k, n),
        "csr": csr_bytes(k, n, nnz),
        "bitmask": bitmask_bytes(k, n, nnz),
    }
    block, count = block_structure(weight_t)
    if block is not None:
        candidates[f"bsr{block[0]}x{block[1]}"] = bsr_bytes(k, n, block, count)
    name = min(candidates, key=candidates.get)
    return FormatChoice(
        format="bsr" if name.startswith("bsr") else name,
        block=block if name.startswith("bsr") else None,
        bytes=candidates[name],
        dense_bytes=candidates["dense"],
        candidates=candidates,
    )


# --- Encoding and decoding -------------------------------------------------------------
#
# Every format stores W^T ([N, K]) by output row; the arrays are what SparseMatMul takes
# after X, in this order:
#
#   dense    weight [K, N] float32
#   csr      indptr int32 [N + 1], indices int16|int32 [nnz] (k), values float32 [nnz]
#   bsr      indptr int32 [ceil(N / R) + 1], indices int16|int32 [nnzb] (k // C),
#            values float32 [nnzb, R, C]; W^T is zero-padded to whole blocks
#   bitmask  bits uint8 [N, ceil(K / 8)] (bit b of byte j is k = 8 j + b),
#            row_offsets int32 [N + 1], values float32 [nnz] (row-major order of W^T)

FORMATS = ("dense", "csr", "bsr", "bitmask")
# The names of each format's arrays, in ``encode`` order (initializer name suffixes).
ARRAY_NAMES = {"dense": ("weight",), "csr": ("indptr", "indices", "values"), "bsr": ("indptr", "indices", "values"),
               "bitmask": ("bits", "row_offsets", "values")}


def index_dtype(extent: int) -> np.dtype:
    return np.dtype(np.int16) if index_bytes(extent) == 2 else np.dtype(np.int32)


def encode(weight: np.ndarray, format: str, block: tuple[int, int] | None = None) -> list[np.ndarray]:
    """Encodes a [K, N] weight in ``format``; returns the arrays in SparseMatMul order."""
    k, n = weight.shape
    if format == "dense":
        return [np.ascontiguousarray(weight)]
    weight_t = np.ascontiguousarray(weight.T)
    if format == "csr":
        rows, cols = np.nonzero(weight_t)
        indptr = np.zeros(n + 1, dtype=np.int32)
        np.cumsum(np.bincount(rows, minlength=n), out=indptr[1:])
        return [indptr, cols.astype(index_dtype(k)), weight_t[rows, cols].astype(weight.dtype)]
    if format == "bsr":
        if block is None:
            raise ValueError("bsr needs a block shape")
        r, c = block
        padded = np.zeros((-(-n // r) * r, -(-k // c) * c), dtype=weight.dtype)
        padded[:n, :k] = weight_t
        tiles = padded.reshape(padded.shape[0] // r, r, padded.shape[1] // c, c).transpose(0, 2, 1, 3)
        present = tiles.any(axis=(2, 3))
        block_rows, block_cols = np.nonzero(present)
        indptr = np.zeros(padded.shape[0] // r + 1, dtype=np.int32)
        np.cumsum(np.bincount(block_rows, minlength=padded.shape[0] // r), out=indptr[1:])
        values = np.ascontiguousarray(tiles[block_rows, block_cols])
        return [indptr, block_cols.astype(index_dtype(padded.shape[1] // c)), values.reshape(-1, r, c)]
    if format == "bitmask":
        mask = weight_t != 0
        bits = np.packbits(mask, axis=1, bitorder="little")
        row_offsets = np.zeros(n + 1, dtype=np.int32)
        np.cumsum(mask.sum(axis=1), out=row_offsets[1:])
        return [bits, row_offsets, weight_t[mask].astype(weight.dtype)]
    raise ValueError(f"unknown format {format!r}; choose one of {', '.join(FORMATS)}")


def decode(arrays: list[np.ndarray], format: str, shape: tuple[int, int],
           block: tuple[int, int] | None = None) -> np.ndarray:
    """Rebuilds the dense [K, N] weight from ``encode``'s arrays."""
    k, n = shape
    if format == "dense":
        return arrays[0].copy()
    if format == "csr":
        indptr, indices, values = arrays
        weight_t = np.zeros((n, k), dtype=values.dtype)
        rows = np.repeat(np.arange(n), np.diff(indptr))
        weight_t[rows, indices.astype(np.int64)] = values
        return weight_t.T.copy()
    if format == "bsr":
        r, c = block
        indptr, indices, values = arrays
        block_rows = np.repeat(np.arange(len(indptr) - 1), np.diff(indptr))
        padded = np.zeros((len(indptr) - 1, -(-k // c), r, c), dtype=values.dtype)
        padded[block_rows, indices.astype(np.int64)] = values
        weight_t = padded.transpose(0, 2, 1, 3).reshape((len(indptr) - 1) * r, -1)
        return weight_t[:n, :k].T.copy()
    if format == "bitmask":
        bits, _, values = arrays
        mask = np.unpackbits(bits, axis=1, count=k, bitorder="little").astype(bool)
        weight_t = np.zeros((n, k), dtype=values.dtype)
        weight_t[mask] = values
        return weight_t.T.copy()
    raise ValueError(f"unknown format {format!r}; choose one of {', '.join(FORMATS)}")
