"""The bytes-moved cost model that chooses a weight's format for a target's kernels.

A weight ``W`` of shape [K, N] is used as ``y = x @ W``; the formats it can take, their
arrays and the bytes their kernels read are described once, in ``formats/`` (dense
``4 K N``; csr, bsr and bitmask by output row; the dual-sparse layouts by input row).

At batch 1 a matmul is memory-bound, so the predicted speedup of a format over dense is
``bytes(dense) / bytes(format)`` times the target's measured (or estimated) efficiency of
its kernel for that format (``KernelCosts``); a sparse kernel replaces the dense one only
when predicted at least ``MIN_PREDICTED_SPEEDUP`` faster. Each target gives its own
costs (``targets/<name>/legalize.py``), and only formats its kernels take are candidates.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

import formats

# Block shapes tried when looking for structure, as (rows of W^T, columns of W^T):
# rows group outputs, columns group inputs.
BLOCK_SHAPES = ((1, 4), (1, 8), (1, 16), (4, 1), (8, 1), (16, 1), (2, 2), (4, 4), (8, 8), (16, 16))

# Structure counts as "block" when nearly all zeros sit in whole zero blocks.
BLOCK_STRUCTURE_TOLERANCE = 0.01


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


@dataclass(frozen=True)
class KernelCosts:
    """What a target's kernels cost per byte, for the format decisions.

    Attributes:
        target: the target's name, in explanations.
        efficiency: for every ``ai.sparsecc`` format the target's sparse kernel takes
            (and ``dense``: 1.0), bytes per second it streams relative to the target's
            dense kernel. Gathers and bit expansion cost instructions that the dense kernel
            does not spend, so a format must save more bytes than its inefficiency costs.
        gated_layout: the ``formats`` layout of the target's dual-sparse kernel.
        gated_efficiency: that kernel's bytes per second relative to the gated dense one.
        source: where the numbers come from (measured, or estimated how), for --explain.

    Raises:
        ValueError: for a format the target has no kernel for, so that the cost model
            never chooses one (``formats`` lists each format's kernels per target).
    """

    target: str
    efficiency: dict[str, float] = field(hash=False)
    gated_layout: str
    gated_efficiency: float
    source: str

    def __post_init__(self):
        for name in self.efficiency:
            if name != "dense" and formats.get(name).kernel(self.target, "matmul") is None:
                raise ValueError(f"the {self.target} target has no sparse kernel for {name}")
        if formats.get(self.gated_layout).kernel(self.target, "gated") is None:
            raise ValueError(f"the {self.target} target has no gated kernel for {self.gated_layout}")

    @property
    def sparse_formats(self) -> tuple[str, ...]:
        """The ``ai.sparsecc`` formats the target's sparse kernel takes."""
        return tuple(name for name in self.efficiency if name != "dense")


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


def decide(weight: np.ndarray, costs: KernelCosts) -> Decision:
    """Chooses the format predicted fastest at batch 1 on ``costs``'s target (bytes moved /
    kernel efficiency), among the formats its sparse kernel takes."""
    choice = choose_format(weight, costs.sparse_formats)
    predicted = {
        name: choice.dense_bytes / size * costs.efficiency["bsr" if name.startswith("bsr") else name]
        for name, size in choice.candidates.items()
    }
    best = max(predicted, key=predicted.get)
    listing = ", ".join(f"{name} {speed:.2f}x" for name, speed in sorted(predicted.items(), key=lambda kv: -kv[1]))
    by = f"{costs.target} kernel costs"
    if best == "dense" or predicted[best] < MIN_PREDICTED_SPEEDUP:
        return Decision("dense", None, 1.0, predicted,
                        f"kept dense: best sparse prediction {max((v for n, v in predicted.items() if n != 'dense'), default=0):.2f}x "
                        f"< {MIN_PREDICTED_SPEEDUP}x ({listing}; {by})")
    block = None
    if best.startswith("bsr"):
        block = tuple(int(v) for v in best[3:].split("x"))
    return Decision("bsr" if block else best, block, predicted[best], predicted,
                    f"{best}: predicted {predicted[best]:.2f}x ({listing}; {by})")


def decide_gated(weight: np.ndarray, costs: KernelCosts) -> Decision:
    """Dense or dual-sparse storage for a weight behind an activation gate.

    Both kernels skip the rows of inactive inputs, so activation sparsity scales them
    alike; what differs is the bytes of each active row: ``4 N`` dense, or those of the
    target's dual-sparse layout (``costs.gated_layout``; on the CPU ``N / 8`` bits plus 4
    bytes per nonzero). A dual-sparse weight is carried as ``bitmask`` in the ONNX graph
    and packed in the target's layout by its legalisation.
    """
    k, n = weight.shape
    nnz = int(np.count_nonzero(weight))
    dual_bytes = formats.get(costs.gated_layout).bytes_read(k, n, nnz)
    dense_bytes = formats.get("dense").bytes_read(k, n, k * n)
    predicted = {"dense": 1.0, "dual": dense_bytes / dual_bytes * costs.gated_efficiency}
    listing = f"dual {predicted['dual']:.2f}x"
    by = f"{costs.target} kernel costs"
    if predicted["dual"] < MIN_PREDICTED_SPEEDUP:
        return Decision("dense", None, 1.0, predicted,
                        f"gated dense: dual-sparse predicted {listing} < {MIN_PREDICTED_SPEEDUP}x ({by})")
    return Decision("bitmask", None, predicted["dual"], predicted, f"dual-sparse: predicted {listing} over gated dense ({by})")


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


def choose_format(weight: np.ndarray, candidates: tuple[str, ...] = ("csr", "bitmask", "bsr")) -> FormatChoice:
    """Picks the format with the fewest bytes for a [K, N] weight among dense and
    ``candidates`` (bsr with the block shape found in its zeros)."""
    k, n = weight.shape
    nnz = int(np.count_nonzero(weight))
    sizes = {"dense": formats.get("dense").bytes_read(k, n, k * n)}
    # csr before bitmask, as the order breaks ties.
    for name in ("csr", "bitmask"):
        if name in candidates:
            sizes[name] = formats.get(name).bytes_read(k, n, nnz)
    block, count = block_structure(weight.T) if "bsr" in candidates else (None, None)
    if block is not None:
        sizes[f"bsr{block[0]}x{block[1]}"] = formats.get("bsr").bytes_read(k, n, count, block=block)
    name = min(sizes, key=sizes.get)
    return FormatChoice(
        format="bsr" if name.startswith("bsr") else name,
        block=block if name.startswith("bsr") else None,
        bytes=sizes[name],
        dense_bytes=sizes["dense"],
        candidates=sizes,
    )


def encode(weight: np.ndarray, format: str, block: tuple[int, int] | None = None) -> list[np.ndarray]:
    """``formats.get(format).encode``: a [K, N] weight's arrays in SparseMatMul order."""
    return formats.get(format).encode(weight, block)


def decode(arrays: list[np.ndarray], format: str, shape: tuple[int, int],
           block: tuple[int, int] | None = None) -> np.ndarray:
    """``formats.get(format).decode``: the dense [K, N] weight of ``encode``'s arrays."""
    return formats.get(format).decode(arrays, shape, block)
