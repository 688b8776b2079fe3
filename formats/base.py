"""What every weight format describes, and the kernel symbols that name its kernels.

A weight ``W`` of shape [K, N] is used as ``y = x @ W``. A format stores ``W`` as a few
arrays; its description (``Format``) holds everything the rest of the compiler asks of it:

- ``layout(k, n, nnz, block)``: each array's name, dtype and shape;
- ``encode`` / ``decode``: dense [K, N] -> arrays -> dense, exact (only zeros are dropped);
- ``bytes_read(k, n, nnz, active_rows)``: the bytes a kernel reads, the cost model's
  measure (at batch 1 a matmul is bound by memory, so fewer bytes is faster);
- ``reference``: the body of its ``ai.sparsecc`` reference function as ONNX text, for the
  formats an ONNX op carries (``passes.sparse_ops``); None for a layout private to a
  target's kernels;
- ``kernels``: the symbol of each kernel that reads it, per target, built from and parsed
  back into ``KernelFacts`` (the shape, stored count and options a symbol spells out).

``nnz`` is the format's stored count, the number its kernel symbols carry: nonzeros for
csr, bitmask and the dual layouts, nonzero blocks for bsr, and values stored (16 per
window, zeros inside a window included) for segments. Dense layouts store every entry and
ignore it.

Room for the next issue: ``value_dtype`` (the dtype of the stored values) and
``group_size`` (values per scale, for quantised values) are part of a description, with
float32 and no scales the only ones built.

This package imports nothing else from the project, so passes and targets can share it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

INDEX_DTYPES = ("int16", "int32")
ID_DTYPES = ("int32", "int64")
#: Kernel roles: ``y = x @ W``; ``y = gate(x) @ W`` (skipping the rows of inactive inputs);
#: rows of ``W^T`` looked up by id (the embedding lookup of a tied output projection).
ROLES = ("matmul", "gated", "gather")
_GATES = {"channel": True, "scalar": False}
# Numeric symbol fields: field -> (the letters before the number, the KernelFacts attribute).
_NUMBERS = {"m": ("m", "m"), "rows": ("r", "m"), "k": ("k", "k"), "n": ("n", "n"), "nnz": ("nnz", "nnz"),
            "nnzb": ("nnzb", "nnz")}


def index_bytes(extent: int) -> int:
    """Bytes per index for indices in ``[0, extent)``: the smallest width that fits."""
    return 2 if extent < 32768 else 4


def index_dtype(extent: int) -> np.dtype:
    return np.dtype(np.int16) if index_bytes(extent) == 2 else np.dtype(np.int32)


def check_weight(weight: np.ndarray) -> None:
    """Raises ValueError unless ``weight`` is a 2-D float32 array (what the kernels take)."""
    if weight.ndim != 2 or weight.dtype != np.float32:
        raise ValueError(f"expected a 2-D float32 weight, got {weight.ndim}-D {weight.dtype}")


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class ArraySpec:
    """One array of a format: its name (the initializer suffix), dtype and shape."""

    name: str
    dtype: np.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


@dataclass(frozen=True)
class KernelFacts:
    """What a kernel symbol spells out.

    Attributes:
        format: the ``FORMATS`` name of the weight layout the kernel reads.
        target: ``cpu`` or ``cuda``.
        role: one of ``ROLES``.
        m: rows of ``x`` (ids looked up, for a gather).
        k, n: the weight's [K, N].
        nnz: the format's stored count (see the module docstring); None for dense layouts.
        block: ``(R, C)`` for bsr.
        index_dtype: the dtype of csr / bsr indices.
        id_dtype: the dtype of a gather's ids.
        per_channel: for a gated kernel, a threshold per input channel rather than one.
    """

    format: str
    target: str
    role: str
    m: int
    k: int
    n: int
    nnz: int | None = None
    block: tuple[int, int] | None = None
    index_dtype: str | None = None
    id_dtype: str | None = None
    per_channel: bool | None = None


@dataclass(frozen=True)
class Kernel:
    """The symbol of one kernel: ``stem`` and one ``_``-separated token per field.

    Fields: ``m`` / ``rows`` (``m1`` / ``r1``), ``k``, ``n``, ``nnz``, ``nnzb`` (a letter
    prefix and a number), ``block`` (``b16x1``), ``index`` (``int16``), ``ids``
    (``int64``), ``gate`` (``channel`` or ``scalar``) and ``seg`` (the literal ``seg``).
    ``parse`` is ``symbol``'s inverse, so the two cannot drift apart.
    """

    target: str
    role: str
    stem: str
    fields: tuple[str, ...]

    def symbol(self, facts: KernelFacts) -> str:
        return "_".join([self.stem, *(_token(field, facts) for field in self.fields)])

    def parse(self, name: str) -> dict | None:
        """The KernelFacts attributes ``name`` spells out, or None if it is not this kernel's."""
        prefix = self.stem + "_"
        if not name.startswith(prefix):
            return None
        tokens = name[len(prefix):].split("_")
        if len(tokens) != len(self.fields):
            return None
        values = {}
        for field, token in zip(self.fields, tokens):
            value = _value(field, token)
            if value is None:
                return None
            values.update(value)
        return values


def _token(field: str, facts: KernelFacts) -> str:
    if field in _NUMBERS:
        letters, attribute = _NUMBERS[field]
        return f"{letters}{getattr(facts, attribute)}"
    if field == "block":
        return f"b{facts.block[0]}x{facts.block[1]}"
    if field == "index":
        return facts.index_dtype
    if field == "ids":
        return facts.id_dtype
    if field == "gate":
        return "channel" if facts.per_channel else "scalar"
    if field == "seg":
        return "seg"
    raise ValueError(f"unknown symbol field {field!r}")


def _digits(text: str) -> int | None:
    return int(text) if text.isascii() and text.isdigit() else None


def _number(token: str, letters: str) -> int | None:
    return _digits(token[len(letters):]) if token.startswith(letters) else None


def _value(field: str, token: str) -> dict | None:
    """``{attribute: value}`` of one token, ``{}`` for a literal, None if it does not fit."""
    if field in _NUMBERS:
        letters, attribute = _NUMBERS[field]
        number = _number(token, letters)
        return None if number is None else {attribute: number}
    if field == "block":
        rows, _, cols = token[1:].partition("x")
        rows, cols = _digits(rows), _digits(cols)
        return {"block": (rows, cols)} if token.startswith("b") and rows is not None and cols is not None else None
    if field == "index":
        return {"index_dtype": token} if token in INDEX_DTYPES else None
    if field == "ids":
        return {"id_dtype": token} if token in ID_DTYPES else None
    if field == "gate":
        return {"per_channel": _GATES[token]} if token in _GATES else None
    if field == "seg":
        return {} if token == "seg" else None
    raise ValueError(f"unknown symbol field {field!r}")


@dataclass(frozen=True)
class Format:
    """One weight format (see the module docstring); each format file subclasses it.

    Attributes:
        name: its key in ``FORMATS`` and the ``ai.sparsecc`` overload name.
        summary: one line for readers and listings.
        arrays: the names of its arrays, in ``encode`` order.
        kernels: the kernels that read it, on every target.
        reference: the ONNX body of its reference function (``passes.sparse_ops``), with
            ``$X`` for the input and ``@shape`` / ``@block`` for the attributes; None for a
            layout that only a target's private ops carry.
        takes_block: whether it has a block shape (the op's ``block`` attribute).
        skips_rows: whether its rows are K's (one per input), which a gated kernel reads
            only for the active inputs; ``bytes_read`` then counts ``active_rows`` of them.
        value_dtype: the dtype of the stored values.
        group_size: stored values per scale (quantised values), None for no scales.
    """

    name: str
    summary: str
    arrays: tuple[str, ...]
    kernels: tuple[Kernel, ...] = ()
    reference: str | None = None
    takes_block: bool = False
    skips_rows: bool = False
    value_dtype: str = "float32"
    group_size: int | None = None

    # --- what each format file defines ---

    def layout(self, k: int, n: int, nnz: int, block: tuple[int, int] | None = None) -> tuple[ArraySpec, ...]:
        """The arrays of a [k, n] weight with ``nnz`` stored, in ``encode`` order."""
        raise NotImplementedError

    def encode(self, weight: np.ndarray, block: tuple[int, int] | None = None) -> list[np.ndarray]:
        """The arrays of a [K, N] weight, in ``layout`` order."""
        raise NotImplementedError

    def decode(self, arrays: list[np.ndarray], shape: tuple[int, int], block: tuple[int, int] | None = None) -> np.ndarray:
        """The dense [K, N] weight of ``encode``'s arrays."""
        raise NotImplementedError

    def stored(self, shapes: list[tuple[int, ...]]) -> int | None:
        """The stored count (``nnz``) of arrays of these shapes: by default the length of
        the last array (the values)."""
        return int(shapes[-1][0])

    def multiply_adds(self, k: int, n: int, nnz: int, block: tuple[int, int] | None = None) -> int:
        """Multiply-adds per row of ``x`` of a kernel reading the whole weight: one per
        stored value by default."""
        return int(nnz)

    # --- derived from those ---

    def bytes_read(self, k: int, n: int, nnz: int, active_rows: int | None = None,
                   block: tuple[int, int] | None = None) -> int:
        """Bytes a kernel reads from the arrays: all of them, or, for a format whose rows
        are skipped (``skips_rows``), those of ``active_rows`` rows, with ``nnz`` the values
        those rows store. With every row active this is the arrays' size.

        Raises:
            ValueError: for ``active_rows`` on a format whose kernels read every row.
        """
        if active_rows is not None and not self.skips_rows:
            raise ValueError(f"{self.name} kernels read every row; active_rows does not apply")
        rows = k if active_rows is None else active_rows
        return sum(spec.nbytes for spec in self.layout(rows, n, nnz, block))

    def kernel(self, target: str, role: str) -> Kernel | None:
        """This format's kernel of ``role`` on ``target``, or None if there is none."""
        return next((kernel for kernel in self.kernels if (kernel.target, kernel.role) == (target, role)), None)

    def facts(self, target: str, role: str, m: int, k: int, n: int, arrays, block: tuple[int, int] | None = None,
              per_channel: bool | None = None, id_dtype: str | None = None) -> KernelFacts:
        """The facts of a kernel reading ``arrays`` (anything with ``shape`` and
        ``dtype``, in ``encode`` order): stored count and index dtype come from them."""
        shapes = [tuple(int(d) for d in array.shape) for array in arrays]
        index = next((str(array.dtype) for name, array in zip(self.arrays, arrays) if name == "indices"), None)
        return KernelFacts(self.name, target, role, m, k, n, self.stored(shapes), block if self.takes_block else None,
                           index, id_dtype, per_channel)

    def symbol(self, facts: KernelFacts) -> str:
        """The global symbol of the kernel ``facts`` describe.

        Raises:
            ValueError: when this format has no such kernel.
        """
        kernel = self.kernel(facts.target, facts.role)
        if kernel is None:
            raise ValueError(f"no {facts.target} {facts.role} kernel reads {self.name}")
        return kernel.symbol(facts)

    def parse(self, name: str) -> KernelFacts | None:
        """The facts of the kernel symbol ``name``, or None if no kernel of this format has it."""
        for kernel in self.kernels:
            values = kernel.parse(name)
            if values is not None:
                base = KernelFacts(self.name, kernel.target, kernel.role, 0, 0, 0)
                return replace(base, **values)
        return None

    def flops(self, facts: KernelFacts) -> float | None:
        """FLOPs of one call (2 per multiply-add), or None for a gather, which copies."""
        if facts.role == "gather":
            return None
        return 2.0 * facts.m * self.multiply_adds(facts.k, facts.n, facts.nnz, facts.block)


# Reference bodies (ONNX text). The row index of every stored entry of a CSR-like
# (indptr, entries) pair, in standard ops: each row r >= 1 marks the position where it
# starts, and the running count of marks at position p is the row p belongs to. Empty
# rows mark the same position twice. ``$ENTRIES`` is the array with one entry per stored
# item.
ROW_IDS = """
    one = Constant <value_ints: ints = [1]> ()
    minus_one = Constant <value_ints: ints = [-1]> ()
    zero_axis = Constant <value: tensor = int64 {0}> ()
    entries = Shape ($ENTRIES)
    slots = Add (entries, one)
    marks0 = ConstantOfShape <value: tensor = int64[1] {0}> (slots)
    starts32 = Slice (indptr, one, minus_one)
    starts = Cast <to: int = 7> (starts32)
    starts_shape = Shape (starts)
    ones = ConstantOfShape <value: tensor = int64[1] {1}> (starts_shape)
    marks = ScatterElements <reduction: string = "add"> (marks0, starts, ones)
    counts = CumSum (marks, zero_axis)
    zero = Constant <value_ints: ints = [0]> ()
    rows = Slice (counts, zero, entries)
"""
