"""ONNX -> Relax for the CPU target, with our kernels behind ``ai.sparsecc.cpu`` ops.

TVM's ONNX importer has no hook for custom ops and ignores the domain, so converters are
added by wrapping its module-level ``_get_convert_map`` for the duration of the import
(notes/tvm-0.27.md, section 1, route A).
"""

from __future__ import annotations

import contextlib
import math

import onnx

from runtime.errors import SparseccError
from targets.cpu import kernels
from targets.cpu.legalize import PANEL_MATMUL


def _panel_matmul_converter(function_cache: dict):
    from tvm import relax
    import tvm.relax.frontend.onnx.onnx_frontend as onnx_frontend

    class PanelMatMul(onnx_frontend.OnnxOpConverter):
        """``y = x @ W`` with W packed by ``kernels.pack_dense_weight``."""

        @classmethod
        def _impl_v1(cls, bb, inputs, attr, params):
            x, packed = inputs
            k, n = int(attr["k"]), int(attr["n"])
            shape = [int(d) for d in x.ty.shape]
            if shape[-1] != k:
                raise SparseccError(f"a matmul expects {k} input features but gets {shape[-1]}.")
            m = math.prod(shape[:-1])
            key = (m, k, n)
            if key not in function_cache:
                function_cache[key] = bb.add_func(kernels.dense_matmul_func(m, k, n), f"dense_matmul_{m}x{k}x{n}")
            flat = bb.emit(relax.op.reshape(x, (m, k)))
            y = bb.emit(relax.call_tir(function_cache[key], [flat, packed], relax.TensorType((m, n), "float32")))
            return relax.op.reshape(y, shape[:-1] + [n])

    return PanelMatMul


@contextlib.contextmanager
def _custom_converters():
    import tvm.relax.frontend.onnx.onnx_frontend as onnx_frontend

    original = onnx_frontend._get_convert_map
    cache: dict = {}
    converters = {PANEL_MATMUL: _panel_matmul_converter(cache)}
    onnx_frontend._get_convert_map = lambda: {**original(), **converters}
    try:
        yield
    finally:
        onnx_frontend._get_convert_map = original


def supported_ops() -> set[str]:
    """ONNX op types the TVM importer can convert, plus ours."""
    import tvm.relax.frontend.onnx.onnx_frontend as onnx_frontend

    return set(onnx_frontend._get_convert_map()) | {PANEL_MATMUL}


def unsupported_ops(model: onnx.ModelProto) -> list[str]:
    """Op types in ``model`` that cannot be compiled, sorted, each once."""
    from passes import sparse_ops

    known = supported_ops()
    ours = {"SparseMatMul", "ActivationGate", "GatedMatMul"}
    return sorted({
        node.op_type for node in model.graph.node
        if not (node.domain == sparse_ops.DOMAIN and node.op_type in ours) and node.op_type not in known
    })


def import_onnx(model: onnx.ModelProto, input_shapes: dict[str, list[int]], input_dtypes: dict[str, str]):
    """Imports a legalized model into a Relax IRModule."""
    from tvm.relax.frontend.onnx import from_onnx

    missing = unsupported_ops(model)
    if missing:
        raise SparseccError(f"the model uses ops sparsecc cannot compile: {', '.join(missing)}.")
    with _custom_converters():
        try:
            return from_onnx(model, shape_dict=input_shapes, dtype_dict=input_dtypes, sanitize_input_names=False)
        except SparseccError:
            raise
        except Exception as exc:  # the importer's errors are many types; the message matters
            detail = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
            raise SparseccError(f"TVM cannot import this model: {detail[:300]}") from None
