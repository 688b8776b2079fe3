"""ONNX -> Relax for the CUDA target: our CUDA kernels behind ``ai.sparsecc.cuda`` ops
(``targets.tvm_import`` does the import)."""

from __future__ import annotations

import math

import onnx

from targets import tvm_import
from targets.cuda import sparse_kernels
from runtime.errors import SparseccError
from targets.cuda.legalize import DENSE_MATMUL, GATED_MATMUL, SPARSE_MATMUL

OURS = {DENSE_MATMUL, SPARSE_MATMUL, GATED_MATMUL}


def _dense_matmul_converter():
    from tvm import relax, te
    import tvm.relax.frontend.onnx.onnx_frontend as onnx_frontend

    class CudaDenseMatMul(onnx_frontend.OnnxOpConverter):
        """``y = x @ W`` with ``W^T`` [N, K] stored: ``y[i, j] = sum_k x[i, k] W^T[j, k]``."""

        @classmethod
        def _impl_v1(cls, bb, inputs, attr, params):
            x, weight_t = inputs
            k, n = int(attr["k"]), int(attr["n"])
            shape = [int(d) for d in x.ty.shape]
            if shape[-1] != k:
                raise SparseccError(f"a matmul expects {k} input features but gets {shape[-1]}.")
            m = math.prod(shape[:-1])

            def dense(a, b):
                r = te.reduce_axis((0, k), name="k")
                return te.compute((m, n), lambda i, j: te.sum(a[i, r] * b[j, r], axis=r), name="dense_matmul")

            flat = bb.emit(relax.op.reshape(x, (m, k)))
            y = bb.emit_te(dense, flat, weight_t, primfunc_name_hint=f"dense_matmul_{m}x{k}x{n}")
            return relax.op.reshape(y, shape[:-1] + [n])

    return CudaDenseMatMul


def unsupported_ops(model: onnx.ModelProto) -> list[str]:
    """Op types in ``model`` that cannot be compiled, sorted, each once."""
    return tvm_import.unsupported_ops(model, OURS)


def import_onnx(model: onnx.ModelProto, input_shapes: dict[str, list[int]], input_dtypes: dict[str, str]):
    """Imports a legalized model into a Relax IRModule."""
    converters = {DENSE_MATMUL: _dense_matmul_converter(),
                  **tvm_import.sparse_converters({}, sparse_kernels.KERNELS, SPARSE_MATMUL, GATED_MATMUL)}
    return tvm_import.import_onnx(model, input_shapes, input_dtypes, converters)
