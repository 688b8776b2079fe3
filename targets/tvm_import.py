"""ONNX -> Relax for the TVM targets, with a target's kernels behind its private ops.

TVM's ONNX importer has no hook for custom ops and ignores the domain, so converters are
added by wrapping its module-level ``_get_convert_map`` for the duration of the import
(notes/tvm-0.27.md, section 1, route A).
"""

from __future__ import annotations

import contextlib
import math

import onnx

from runtime.errors import SparseccError
from targets.kernel_args import Kernel
from targets.legalize import DUAL_BITMASK, DUAL_NONE, DUAL_SEGMENTS


def text_attribute(value) -> str:
    """A string attribute as the importer passes it (bytes or str)."""
    return value.decode() if isinstance(value, bytes) else str(value)


def _kernel_call(bb, cache: dict, kernel: Kernel, layout: str, facts: tuple, x, operands: list, n: int):
    """Reshapes ``x`` to [m, k], calls ``kernel``'s PrimFunc for m rows on it and the
    ``operands``, reshapes back."""
    from tvm import relax

    shape = [int(d) for d in x.ty.shape]
    m = math.prod(shape[:-1])
    key = kernel.key(layout, m, facts)
    if key not in cache:
        function = kernel.build(m, *facts)
        cache[key] = bb.add_func(function, str(function.attrs["global_symbol"]))
    flat = bb.emit(relax.op.reshape(x, (m, shape[-1])))
    y = bb.emit(relax.call_tir(cache[key], [flat, *operands], relax.TensorType((m, n), "float32")))
    return relax.op.reshape(y, shape[:-1] + [n])


#: The gated op's ``dual`` attribute (``targets.legalize``) -> the weight layout, the name
#: of its entry in a target's kernel table.
GATED_LAYOUTS = {DUAL_NONE: "gated", DUAL_BITMASK: "dual", DUAL_SEGMENTS: "segments"}


def table_entry(kernels: dict, op_type: str, layout: str, gated: bool) -> Kernel:
    """The entry of ``kernels`` (a target's ``KERNELS``) for a weight ``layout`` of the op
    ``op_type``; a SparseccError naming the layouts it has otherwise."""
    entry = kernels.get(layout)
    if entry is None or entry.gated != gated:
        known = ", ".join(sorted(name for name, kernel in kernels.items() if kernel.gated == gated))
        raise SparseccError(f"{op_type} has no kernel for weights in the {layout!r} layout on this target "
                            f"(it has {known}).")
    return entry


def sparse_converters(cache: dict, kernels: dict, sparse_op: str, gated_op: str) -> dict:
    """Converters of ``sparse_op`` and ``gated_op`` (``targets.legalize.Backend``) that call
    the kernels of the table ``kernels`` (a target's ``KERNELS``, ``targets.kernel_args.Kernel``
    entries): the sparse op's ``format`` attribute, or the gated op's ``dual``, names the
    entry, which reads its arguments from the op and builds its PrimFunc for the rows of
    ``x``; each PrimFunc is added to the module once per shape (``cache``)."""
    import tvm.relax.frontend.onnx.onnx_frontend as onnx_frontend

    class KernelTableOp(onnx_frontend.OnnxOpConverter):
        op_type: str
        gated: bool

        @classmethod
        def layout(cls, attr) -> str:
            raise NotImplementedError

        @classmethod
        def _impl_v1(cls, bb, inputs, attr, params):
            layout = cls.layout(attr)
            kernel = table_entry(kernels, cls.op_type, layout, cls.gated)
            x, *operands = inputs
            facts = kernel.facts(attr, operands)
            return _kernel_call(bb, cache, kernel, layout, facts, x, operands, int(attr["n"]))

    class SparseMatMul(KernelTableOp):
        """``y = x @ W`` with W in the op's ``format`` (``passes.sparse_formats.encode``)."""

        op_type, gated = sparse_op, False

        @classmethod
        def layout(cls, attr) -> str:
            return text_attribute(attr["format"])

    class GatedMatMul(KernelTableOp):
        """``y = gate(x) @ W``; W dense [K, N] (``dual`` 0) or packed by the target's backend
        (``pack_dual`` for ``dual`` 1, ``pack_segments`` for ``dual`` 2)."""

        op_type, gated = gated_op, True

        @classmethod
        def layout(cls, attr) -> str:
            dual = int(attr.get("dual", DUAL_NONE))
            return GATED_LAYOUTS.get(dual, f"dual={dual}")

    return {sparse_op: SparseMatMul, gated_op: GatedMatMul}


@contextlib.contextmanager
def custom_converters(converters: dict):
    """TVM's ONNX importer with ``converters`` (op type -> converter class) added."""
    import tvm.relax.frontend.onnx.onnx_frontend as onnx_frontend

    original = onnx_frontend._get_convert_map
    onnx_frontend._get_convert_map = lambda: {**original(), **converters}
    try:
        yield
    finally:
        onnx_frontend._get_convert_map = original


def unsupported_ops(model: onnx.ModelProto, ours: set[str]) -> list[str]:
    """Op types in ``model`` that cannot be compiled, sorted, each once; ``ours`` are the
    target's private op types."""
    import tvm.relax.frontend.onnx.onnx_frontend as onnx_frontend
    from passes import sparse_ops

    known = set(onnx_frontend._get_convert_map()) | ours
    public = {"SparseMatMul", "ActivationGate", "GatedMatMul"}
    # Ops that ``targets.legalize`` rewrites for every TVM target, by domain.
    legalized = {sparse_ops.DOMAIN: public, "com.microsoft": {"MatMulNBits"}}
    return sorted({
        node.op_type for node in model.graph.node
        if node.op_type not in legalized.get(node.domain, ()) and node.op_type not in known
    })


def import_onnx(model: onnx.ModelProto, input_shapes: dict[str, list[int]], input_dtypes: dict[str, str], converters: dict):
    """Imports a legalized model into a Relax IRModule, with the target's ``converters``."""
    from tvm.relax.frontend.onnx import from_onnx

    missing = unsupported_ops(model, set(converters))
    if missing:
        raise SparseccError(f"the model uses ops sparsecc cannot compile: {', '.join(missing)}.")
    with custom_converters(converters):
        try:
            return from_onnx(model, shape_dict=input_shapes, dtype_dict=input_dtypes, sanitize_input_names=False)
        except SparseccError:
            raise
        except Exception as exc:  # the importer's errors are many types; the message matters
            detail = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
            raise SparseccError(f"TVM cannot import this model: {detail[:300]}") from None
