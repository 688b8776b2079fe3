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
from targets.cpu import kernels, sparse_kernels
from targets.cpu.legalize import GATED_MATMUL, PACKED_GATHER, PANEL_MATMUL, SPARSE_MATMUL


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


def _packed_gather_converter():
    from tvm import te
    import tvm.relax.frontend.onnx.onnx_frontend as onnx_frontend

    class PackedGather(onnx_frontend.OnnxOpConverter):
        """Rows ``ids`` of a table stored as its transpose in the panel layout
        (``legalize._gather_from_packed``)."""

        @classmethod
        def _impl_v1(cls, bb, inputs, attr, params):
            packed, ids = inputs
            width = int(packed.ty.shape[2])
            k = int(attr["k"])
            shape = [int(d) for d in ids.ty.shape]

            def gather(table, index):
                return te.compute(
                    (*shape, k),
                    lambda *i: table[index[i[:-1]] // width, i[-1], index[i[:-1]] % width],
                    name="packed_gather",
                )

            # One row of a few hundred values: a serial loop (1 us) beats waking the
            # thread pool, so the function is marked scheduled and left as it is.
            return bb.emit_te(gather, packed, ids, primfunc_name_hint="packed_gather",
                              primfunc_attrs={"tirx.is_scheduled": True})

    return PackedGather


def _text(value) -> str:
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


def _sparse_converters(cache: dict):
    import tvm.relax.frontend.onnx.onnx_frontend as onnx_frontend

    class CpuSparseMatMul(onnx_frontend.OnnxOpConverter):
        """``y = x @ W`` with W in csr, bsr or bitmask (``passes.sparse_formats.encode``)."""

        @classmethod
        def _impl_v1(cls, bb, inputs, attr, params):
            x, *arrays = inputs
            format, k, n = _text(attr["format"]), int(attr["k"]), int(attr["n"])
            stored = int(arrays[-1].ty.shape[0]) if format != "bsr" else int(arrays[1].ty.shape[0])
            if format == "csr":
                index = str(arrays[1].ty.dtype)
                build = lambda m: sparse_kernels.csr_matmul_func(m, k, n, stored, index)  # noqa: E731
                key = ("csr", k, n, stored, index)
            elif format == "bsr":
                block, index = tuple(int(v) for v in attr["block"]), str(arrays[1].ty.dtype)
                build = lambda m: sparse_kernels.bsr_matmul_func(m, k, n, block, stored, index)  # noqa: E731
                key = ("bsr", k, n, block, stored, index)
            else:
                build = lambda m: sparse_kernels.bitmask_matmul_func(m, k, n, stored)  # noqa: E731
                key = ("bitmask", k, n, stored)
            return _kernel_call(bb, cache, key, build, x, arrays, n)

    class CpuGatedMatMul(onnx_frontend.OnnxOpConverter):
        """``y = gate(x) @ W``; W dense [K, N] or ``pack_dual_weight`` arrays (``dual``)."""

        @classmethod
        def _impl_v1(cls, bb, inputs, attr, params):
            x, threshold, *arrays = inputs
            k, n, dual = int(attr["k"]), int(attr["n"]), bool(attr.get("dual", 0))
            per_channel = int(threshold.ty.shape[0]) == k and k > 1
            if dual:
                nnz = int(arrays[-1].ty.shape[0])
                build = lambda m: sparse_kernels.dual_matmul_func(m, k, n, nnz, per_channel)  # noqa: E731
                key = ("dual", k, n, nnz, per_channel)
            else:
                build = lambda m: sparse_kernels.gated_matmul_func(m, k, n, per_channel)  # noqa: E731
                key = ("gated", k, n, per_channel)
            return _kernel_call(bb, cache, key, build, x, [threshold, *arrays], n)

    return {SPARSE_MATMUL: CpuSparseMatMul, GATED_MATMUL: CpuGatedMatMul}


@contextlib.contextmanager
def _custom_converters():
    import tvm.relax.frontend.onnx.onnx_frontend as onnx_frontend

    original = onnx_frontend._get_convert_map
    cache: dict = {}
    converters = {PANEL_MATMUL: _panel_matmul_converter(cache), PACKED_GATHER: _packed_gather_converter(),
                  **_sparse_converters(cache)}
    onnx_frontend._get_convert_map = lambda: {**original(), **converters}
    try:
        yield
    finally:
        onnx_frontend._get_convert_map = original


def supported_ops() -> set[str]:
    """ONNX op types the TVM importer can convert, plus ours."""
    import tvm.relax.frontend.onnx.onnx_frontend as onnx_frontend

    return set(onnx_frontend._get_convert_map()) | {PANEL_MATMUL, SPARSE_MATMUL, GATED_MATMUL, PACKED_GATHER}


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
