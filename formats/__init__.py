"""The weight formats, one file each, found by name in one table.

``FORMATS`` holds every layout a weight takes on its way to a kernel: the four that
``ai.sparsecc`` ops carry (``dense``, ``csr``, ``bsr``, ``bitmask``: those with a
``reference`` body) and the layouts only target kernels read (``panels``,
``bitmask_rows``, ``bitmask_words``, ``segments``). A new format is one file here (a
``Format`` subclass and its ``FORMAT``), one row below, and one kernel body per target
that wants it. See ``formats.base`` for what a description holds.
"""

from __future__ import annotations

from formats import bitmask, bitmask_rows, bitmask_words, bsr, csr, dense, panels, segments
from formats.base import ArraySpec, Format, Kernel, KernelFacts, index_bytes, index_dtype

__all__ = ["FORMATS", "ArraySpec", "Format", "Kernel", "KernelFacts", "get", "index_bytes", "index_dtype",
           "onnx_formats", "parse_symbol", "formats_with_kernel"]

FORMATS: dict[str, Format] = {module.FORMAT.name: module.FORMAT for module in (
    dense, csr, bsr, bitmask, panels, bitmask_rows, bitmask_words, segments)}


def get(name: str) -> Format:
    """The format called ``name``.

    Raises:
        ValueError: for an unknown name, listing the choices.
    """
    if name not in FORMATS:
        raise ValueError(f"unknown format {name!r}; choose one of {', '.join(FORMATS)}")
    return FORMATS[name]


def onnx_formats() -> tuple[str, ...]:
    """The formats an ``ai.sparsecc`` op carries (those with a reference body), in table order."""
    return tuple(name for name, format in FORMATS.items() if format.reference is not None)


def formats_with_kernel(target: str, role: str, names: tuple[str, ...] | None = None) -> tuple[str, ...]:
    """The formats (among ``names``, all by default) that ``target`` has a ``role`` kernel for."""
    return tuple(name for name in (FORMATS if names is None else names) if get(name).kernel(target, role) is not None)


def parse_symbol(name: str) -> KernelFacts | None:
    """The facts of one of our kernels from its global symbol, or None for any other name."""
    for format in FORMATS.values():
        facts = format.parse(name)
        if facts is not None:
            return facts
    return None


def symbol(format: str, target: str, role: str, m: int, k: int, n: int, **facts) -> str:
    """The global symbol of ``format``'s ``role`` kernel on ``target`` (``KernelFacts``'
    other fields as keywords: ``nnz``, ``block``, ``index_dtype``, ``id_dtype``,
    ``per_channel``): the kernels name themselves with it, and ``parse_symbol`` reads it
    back, so a name and its parser cannot drift apart."""
    return get(format).symbol(KernelFacts(format, target, role, m, k, n, **facts))
