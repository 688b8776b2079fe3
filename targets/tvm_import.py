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
from targets.legalize import DUAL_BITMASK, DUAL_SEGMENTS


def text_attribute(value) -> str:
    """A string attribute as the importer passes it (bytes or str)."""
    return value.decode() if isinstance(value, bytes) else str(value)


def _kernel_call(bb, cache: dict, key: tuple, build, x, args: list, n: int):
    """Reshapes ``x`` to [m, k], calls the kernel ``build(m)`` on it, reshapes back."""
    from tvm import relax

    shape = [int(d) for d in x.ty.shape]
    m = math.prod(shape[:-1])
    if (m, *key) not in cache:
        function = build(m)
        cache[(m, *key)] = bb.add_func(function, str(function.attrs["global_symbol"]))
    flat = bb.emit(relax.op.reshape(x, (m, shape[-1])))
    y = bb.emit(relax.call_tir(cache[(m, *key)], [flat, *args], relax.TensorType((m, n), "float32")))
    return relax.op.reshape(y, shape[:-1] + [n])


def sparse_converters(cache: dict, kernels, sparse_op: str, gated_op: str) -> dict:
    """Converters of ``sparse_op`` and ``gated_op`` (``targets.legalize.Backend``) that call
    the PrimFunc builders of the module ``kernels`` (``csr_matmul_func``,
    ``bsr_matmul_func``, ``bitmask_matmul_func``, ``gated_matmul_func``,
    ``dual_matmul_func``; operands as ``targets.cpu.sparse_kernels`` takes them)."""
    import tvm.relax.frontend.onnx.onnx_frontend as onnx_frontend

    class SparseMatMul(onnx_frontend.OnnxOpConverter):
        """``y = x @ W`` with W in csr, bsr or bitmask (``passes.sparse_formats.encode``)."""

        @classmethod
        def _impl_v1(cls, bb, inputs, attr, params):
            x, *arrays = inputs
            format, k, n = text_attribute(attr["format"]), int(attr["k"]), int(attr["n"])
            stored = int(arrays[-1].ty.shape[0]) if format != "bsr" else int(arrays[1].ty.shape[0])
            if format == "csr":
                index = str(arrays[1].ty.dtype)
                build = lambda m: kernels.csr_matmul_func(m, k, n, stored, index)  # noqa: E731
                key = ("csr", k, n, stored, index)
            elif format == "bsr":
                block, index = tuple(int(v) for v in attr["block"]), str(arrays[1].ty.dtype)
                build = lambda m: kernels.bsr_matmul_func(m, k, n, block, stored, index)  # noqa: E731
                key = ("bsr", k, n, block, stored, index)
            else:
                build = lambda m: kernels.bitmask_matmul_func(m, k, n, stored)  # noqa: E731
                key = ("bitmask", k, n, stored)
            return _kernel_call(bb, cache, key, build, x, arrays, n)

    class GatedMatMul(onnx_frontend.OnnxOpConverter):
        """``y = gate(x) @ W``; W dense [K, N], ``pack_dual_weight``'s arrays (``dual`` 1) or
        ``pack_segment_weight``'s (``dual`` 2, a target whose backend packs them)."""

        @classmethod
        def _impl_v1(cls, bb, inputs, attr, params):
            x, threshold, *arrays = inputs
            k, n, dual = int(attr["k"]), int(attr["n"]), int(attr.get("dual", 0))
            per_channel = int(threshold.ty.shape[0]) == k and k > 1
            if dual == DUAL_SEGMENTS:
                segments = int(arrays[1].ty.shape[0])
                build = lambda m: kernels.segment_matmul_func(m, k, n, segments, per_channel)  # noqa: E731
                key = ("segments", k, n, segments, per_channel)
            elif dual == DUAL_BITMASK:
                nnz = int(arrays[-1].ty.shape[0])
                build = lambda m: kernels.dual_matmul_func(m, k, n, nnz, per_channel)  # noqa: E731
                key = ("dual", k, n, nnz, per_channel)
            else:
                build = lambda m: kernels.gated_matmul_func(m, k, n, per_channel)  # noqa: E731
                key = ("gated", k, n, per_channel)
            return _kernel_call(bb, cache, key, build, x, [threshold, *arrays], n)

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
    return sorted({
        node.op_type for node in model.graph.node
        if not (node.domain == sparse_ops.DOMAIN and node.op_type in public) and node.op_type not in known
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
