"""Sparse weight formats and the bytes-moved cost model that chooses between them.

A weight ``W`` of shape [K, N] is used as ``y = x @ W``. Sparse formats store its transpose
by output row (``N`` rows of length ``K``), so a kernel computes each output from one row:

- ``dense``: ``4 K N`` bytes (fp32).
- ``csr``: values plus one column index per nonzero (int16 when ``K < 32768``, else int32)
  plus ``N + 1`` int32 row pointers.
- ``bsr RxC``: each stored block holds ``R x C`` values and one index; ``N / R + 1`` pointers.
- ``bitmask``: one bit per element plus the nonzero values.

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
    return nonzero_blocks * (rows * cols * VALUE_BYTES + index_bytes(k // cols)) + (n // rows + 1) * POINTER_BYTES


def bitmask_bytes(k: int, n: int, nnz: int) -> int:
    return (k * n + 7) // 8 + nnz * VALUE_BYTES


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
