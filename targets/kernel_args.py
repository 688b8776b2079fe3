"""What the hand-written TIR kernels of every target share about their arguments.

A target's sparse kernels (``targets.cpu.sparse_kernels``, ``targets.cuda.sparse_kernels``)
are builders ``f(m, *facts) -> PrimFunc``, one per weight format, specialised to one shape.
This module holds the three things about those arguments that do not depend on the
target:

- the checks of a builder's sizes, dtypes and blocks (a ``ValueError`` naming the bad
  argument), one function per format;
- the function attributes every such PrimFunc carries (``tirx.is_scheduled``: the loops
  are written as they should run, so no default schedule touches them);
- where the facts come from in a legalized op (``targets.legalize``): ``Kernel``, the
  entry of a target's ``KERNELS = {format: Kernel}`` table, reads them from the op's
  attributes and operand types, which is all ``targets.tvm_import`` needs to call it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

#: Dtypes of the column (csr) or block-column (bsr) indices.
INDEX_DTYPES = ("int16", "int32")
#: Dtypes of the token ids a row gather takes.
ID_DTYPES = ("int32", "int64")
#: Block sizes the BSR kernels support along each side (power-of-two lane reductions).
BSR_BLOCK_SIDES = (1, 2, 4, 8, 16)


def func_attrs(symbol: str) -> dict:
    """The attributes of a hand-scheduled kernel whose global symbol is ``symbol``."""
    return {"global_symbol": symbol, "tir.noalias": True, "tirx.is_scheduled": True}


def check_sizes(**sizes: int) -> None:
    """Raises ValueError unless every size is a positive integer."""
    for name, value in sizes.items():
        if not isinstance(value, (int, np.integer)) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def check_count(name: str, value: int) -> None:
    """Raises ValueError unless ``value`` is a non-negative integer."""
    if not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")


def check_index_dtype(index_dtype: str) -> None:
    """Raises ValueError for an index dtype the kernels do not read."""
    if index_dtype not in INDEX_DTYPES:
        raise ValueError(f"index_dtype must be one of {INDEX_DTYPES}, got {index_dtype!r}")


def check_weight(weight: np.ndarray) -> None:
    """Raises ValueError unless ``weight`` is a 2-D float32 array (what the packers take)."""
    if weight.ndim != 2 or weight.dtype != np.float32:
        raise ValueError(f"expected a 2-D float32 weight, got {weight.ndim}-D {weight.dtype}")


def check_csr(k: int, n: int, nnz: int, index_dtype: str) -> None:
    """The checks of a csr kernel's arguments past ``m``."""
    check_sizes(k=k, n=n)
    check_count("nnz", nnz)
    check_index_dtype(index_dtype)
    if index_dtype == "int16" and k > 32768:
        raise ValueError(f"int16 indices cannot address k={k} columns")


def check_bsr(k: int, n: int, block: tuple[int, int], nnzb: int, index_dtype: str) -> None:
    """The checks of a bsr kernel's arguments past ``m``."""
    check_sizes(k=k, n=n)
    check_count("nnzb", nnzb)
    check_index_dtype(index_dtype)
    if len(block) != 2 or any(side not in BSR_BLOCK_SIDES for side in block):
        raise ValueError(f"block sides must be in {BSR_BLOCK_SIDES}, got {block!r}")


def check_gate(per_channel: bool, k_parts: int) -> None:
    """The checks of a gated or dual-sparse kernel's gate and split."""
    if not isinstance(per_channel, (bool, np.bool_)):
        raise ValueError(f"per_channel must be a bool, got {per_channel!r}")
    check_sizes(k_parts=k_parts)


def check_gather(rows: int, k: int, n: int, nnz: int, id_dtype: str) -> None:
    """The checks of a row gather's arguments past its format's own."""
    check_sizes(rows=rows, k=k, n=n)
    check_count("nnz", nnz)
    if id_dtype not in ID_DTYPES:
        raise ValueError(f"id_dtype must be one of {ID_DTYPES}, got {id_dtype!r}")


# --- The PrimFuncs of the formats both targets have a kernel for ----------------------------
#
# A kernel's parameters are its format's arrays between ``x`` (and the threshold) and
# ``y``, the same on every target; ``loops`` is the target's skeleton with its body for the
# format (a macro taking ``x``, the arrays as a tuple and ``y``).


def csr_kernel(m: int, k: int, n: int, nnz: int, index_dtype: str, symbol: str, loops):
    """The PrimFunc ``symbol(x [m, k], indptr int32 [n + 1], indices [nnz], values float32
    [nnz], y [m, n])`` running ``loops(x, (indptr, indices, values), y)``."""
    from tvm.script import tirx as T

    @T.prim_func
    def csr_matmul(
        x: T.Buffer((m, k), "float32"),
        indptr: T.Buffer((n + 1,), "int32"),
        indices: T.Buffer((nnz,), index_dtype),
        values: T.Buffer((nnz,), "float32"),
        y: T.Buffer((m, n), "float32"),
    ):
        T.func_attr(func_attrs(symbol))
        loops(x, (indptr, indices, values), y)

    return csr_matmul


def bsr_kernel(m: int, k: int, n: int, block: tuple[int, int], nnzb: int, index_dtype: str, symbol: str, loops):
    """The PrimFunc ``symbol(x [m, k], indptr int32 [ceil(n / R) + 1], indices [nnzb],
    values float32 [nnzb, R, C], y [m, n])`` running ``loops(x, (indptr, indices, values),
    y)``."""
    from tvm.script import tirx as T

    block_r, block_c = block
    block_rows = -(-n // block_r)

    @T.prim_func
    def bsr_matmul(
        x: T.Buffer((m, k), "float32"),
        indptr: T.Buffer((block_rows + 1,), "int32"),
        indices: T.Buffer((nnzb,), index_dtype),
        values: T.Buffer((nnzb, block_r, block_c), "float32"),
        y: T.Buffer((m, n), "float32"),
    ):
        T.func_attr(func_attrs(symbol))
        loops(x, (indptr, indices, values), y)

    return bsr_matmul


def gated_kernel(m: int, k: int, n: int, per_channel: bool, symbol: str, loops):
    """The PrimFunc ``symbol(x [m, k], threshold float32 [k] or [1], w float32 [k, n],
    y [m, n])`` running ``loops(x, threshold, (w,), y)``."""
    from tvm.script import tirx as T

    threshold_size = k if per_channel else 1

    @T.prim_func
    def gated_matmul(
        x: T.Buffer((m, k), "float32"),
        threshold: T.Buffer((threshold_size,), "float32"),
        w: T.Buffer((k, n), "float32"),
        y: T.Buffer((m, n), "float32"),
    ):
        T.func_attr(func_attrs(symbol))
        loops(x, threshold, (w,), y)

    return gated_matmul


def gate_name(per_channel: bool) -> str:
    """The last part of a gated kernel's global symbol: ``channel`` or ``scalar``."""
    return "channel" if per_channel else "scalar"


# --- Kernel tables ----------------------------------------------------------------------


@dataclass(frozen=True)
class Kernel:
    """One entry of a target's ``KERNELS`` table: a weight format's kernel.

    Attributes:
        gated: whether it serves the gated op (operands ``x, threshold, *arrays``) rather
            than the sparse one (``x, *arrays``); ``targets.legalize.Backend``.
        facts: ``(attrs, operands) -> facts``: the builder's arguments past ``m`` from the
            op's attributes and its operands after ``x`` (anything with ``.ty.shape`` and
            ``.ty.dtype``, as TVM's ONNX importer passes them).
        build: ``(m, *facts) -> PrimFunc``: the kernel for ``m`` rows of ``x``.
    """

    gated: bool
    facts: Callable[[dict, list], tuple]
    build: Callable[..., Any]

    def key(self, format: str, m: int, facts: tuple) -> tuple:
        """What identifies the PrimFunc ``build(m, *facts)``: one per shape in a module."""
        return (m, format, *facts)


def _size(operand, axis: int = 0) -> int:
    return int(operand.ty.shape[axis])


def _per_channel(threshold, k: int) -> bool:
    # A threshold per input channel has k entries; one of [1] is shared (and at k = 1 the
    # two are the same kernel).
    return _size(threshold) == k and k > 1


def csr_facts(attrs: dict, operands: list) -> tuple:
    """``(k, n, nnz, index_dtype)`` of a sparse op on ``[indptr, indices, values]``."""
    return int(attrs["k"]), int(attrs["n"]), _size(operands[-1]), str(operands[1].ty.dtype)


def bsr_facts(attrs: dict, operands: list) -> tuple:
    """``(k, n, block, nnzb, index_dtype)`` of a sparse op on ``[indptr, indices, values]``."""
    block = tuple(int(v) for v in attrs["block"])
    return int(attrs["k"]), int(attrs["n"]), block, _size(operands[1]), str(operands[1].ty.dtype)


def bitmask_facts(attrs: dict, operands: list) -> tuple:
    """``(k, n, nnz)`` of a sparse op on ``[bits, row_offsets, values]``."""
    return int(attrs["k"]), int(attrs["n"]), _size(operands[-1])


def gated_facts(attrs: dict, operands: list) -> tuple:
    """``(k, n, per_channel)`` of a gated op on ``[threshold, w]``."""
    k = int(attrs["k"])
    return k, int(attrs["n"]), _per_channel(operands[0], k)


def dual_facts(attrs: dict, operands: list) -> tuple:
    """``(k, n, nnz, per_channel)`` of a gated op on ``[threshold, *arrays, values]``."""
    k = int(attrs["k"])
    return k, int(attrs["n"]), _size(operands[-1]), _per_channel(operands[0], k)


def segment_facts(attrs: dict, operands: list) -> tuple:
    """``(k, n, segments, per_channel)`` of a gated op on ``[threshold, row_offsets,
    starts, values]``."""
    k = int(attrs["k"])
    return k, int(attrs["n"]), _size(operands[2]), _per_channel(operands[0], k)


#: Every weight layout a kernel table may name: whether its kernel serves the gated op,
#: and how its arguments are read from the op.
LAYOUTS = {
    "csr": (False, csr_facts),
    "bsr": (False, bsr_facts),
    "bitmask": (False, bitmask_facts),
    "gated": (True, gated_facts),
    "dual": (True, dual_facts),
    "segments": (True, segment_facts),
}


def kernel_table(**builders) -> dict[str, Kernel]:
    """A target's ``KERNELS`` from its builders by layout name (``csr=csr_matmul_func``).

    Raises:
        ValueError: for a name that is not in ``LAYOUTS``.
    """
    unknown = sorted(set(builders) - set(LAYOUTS))
    if unknown:
        raise ValueError(f"unknown weight layouts {unknown}; the layouts are {sorted(LAYOUTS)}")
    return {name: Kernel(*LAYOUTS[name], build=build) for name, build in builders.items()}
