"""ONNX -> Relax for the CPU target, with our kernels behind ``ai.sparsecc.cpu`` ops
(``targets.tvm_import`` does the import)."""

from __future__ import annotations

import math

import onnx

from runtime.errors import SparseccError
from targets import tvm_import
from targets.attention import DECODE_ATTENTION
from targets.cpu import attention, kernels, sparse_kernels
from targets.cpu.legalize import (GATED_MATMUL, PACKED_GATHER, PANEL_MATMUL, QUANT_GATHER, QUANT_MATMUL, SPARSE_GATHER,
                                  SPARSE_MATMUL)


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


def _quant_matmul_converter(function_cache: dict):
    from tvm import relax
    import tvm.relax.frontend.onnx.onnx_frontend as onnx_frontend

    from targets.cpu import quant_kernels

    class QuantMatMul(onnx_frontend.OnnxOpConverter):
        """``y = x @ W`` with W quantized (``quant_kernels.pack``), on
        ``quant_kernels``' int8 / int4 kernels (each at its ``default_path`` for the rows)."""

        @classmethod
        def _impl_v1(cls, bb, inputs, attr, params):
            x, *arrays = inputs
            k, n, group = int(attr["k"]), int(attr["n"]), int(attr["group"])
            dtype = tvm_import.text_attribute(attr["dtype"])
            shape = [int(d) for d in x.ty.shape]
            if shape[-1] != k:
                raise SparseccError(f"a matmul expects {k} input features but gets {shape[-1]}.")
            m = math.prod(shape[:-1])
            key = ("quant", dtype, m, k, n, group)
            if key not in function_cache:
                if dtype == "int8":
                    function = quant_kernels.int8_matmul_func(m, k, n, group)
                else:
                    function = quant_kernels.int4_matmul_func(m, k, n, group, symmetric=dtype == "int4sym")
                function_cache[key] = bb.add_func(function, str(function.attrs["global_symbol"]))
            flat = bb.emit(relax.op.reshape(x, (m, k)))
            y = bb.emit(relax.call_tir(function_cache[key], [flat, *arrays], relax.TensorType((m, n), "float32")))
            return relax.op.reshape(y, shape[:-1] + [n])

    return QuantMatMul


def _quant_gather_converter():
    import tvm.relax.frontend.onnx.onnx_frontend as onnx_frontend

    from targets.cpu import quant_kernels

    class QuantGather(onnx_frontend.OnnxOpConverter):
        """Rows ``ids`` of an embedding table tied to a quantized output projection, from
        its stored arrays (``quant_kernels.gather_rows``)."""

        @classmethod
        def _impl_v1(cls, bb, inputs, attr, params):
            ids, codes, scales, *mins = inputs
            dtype, k, group = tvm_import.text_attribute(attr["dtype"]), int(attr["k"]), int(attr["group"])

            def gather(ids, codes, scales, *mins):
                return quant_kernels.gather_rows(ids, codes, scales, mins[0] if mins else None, dtype, k, group)

            # One row of a few hundred values: a serial loop, as PackedGather's.
            return bb.emit_te(gather, ids, codes, scales, *mins, primfunc_name_hint="quant_gather",
                              primfunc_attrs={"tirx.is_scheduled": True})

    return QuantGather


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


def _sparse_gather_converter(function_cache: dict):
    from tvm import relax
    import tvm.relax.frontend.onnx.onnx_frontend as onnx_frontend

    class SparseGather(onnx_frontend.OnnxOpConverter):
        """Rows ``ids`` of a table stored as the csr or bitmask arrays of a tied output
        projection (``legalize._sparse_gather``)."""

        @classmethod
        def _impl_v1(cls, bb, inputs, attr, params):
            ids, *arrays = inputs
            format, k, n = tvm_import.text_attribute(attr["format"]), int(attr["k"]), int(attr["n"])
            shape = [int(d) for d in ids.ty.shape]
            rows, nnz, id_dtype = math.prod(shape), int(arrays[-1].ty.shape[0]), str(ids.ty.dtype)
            if format == "csr":
                index_dtype = str(arrays[1].ty.dtype)
                key = ("csr_gather", rows, k, n, nnz, index_dtype, id_dtype)
                build = lambda: sparse_kernels.csr_gather_func(rows, k, n, nnz, index_dtype, id_dtype)  # noqa: E731
            else:
                key = ("bitmask_gather", rows, k, n, nnz, id_dtype)
                build = lambda: sparse_kernels.bitmask_gather_func(rows, k, n, nnz, id_dtype)  # noqa: E731
            if key not in function_cache:
                function = build()
                function_cache[key] = bb.add_func(function, str(function.attrs["global_symbol"]))
            flat = bb.emit(relax.op.reshape(ids, (rows,)))
            y = bb.emit(relax.call_tir(function_cache[key], [flat, *arrays], relax.TensorType((rows, k), "float32")))
            return relax.op.reshape(y, shape + [k])

    return SparseGather


def _decode_attention_converter(function_cache: dict):
    from tvm import relax
    import tvm.relax.frontend.onnx.onnx_frontend as onnx_frontend

    class DecodeAttention(onnx_frontend.OnnxOpConverter):
        """``targets.attention``'s fused decode attention on ``attention.decode_attention_func``."""

        @classmethod
        def _impl_v1(cls, bb, inputs, attr, params):
            q, key, value, mask, new_score, new_value = inputs
            _, heads, group, dim = (int(d) for d in q.ty.shape)
            slots = int(key.ty.shape[-1])
            cache_key = ("decode_attention", heads, group, dim, slots, float(attr["scale"]))
            if cache_key not in function_cache:  # one function for every layer of that shape
                function = attention.decode_attention_func(*cache_key[1:])
                function_cache[cache_key] = bb.add_func(function, str(function.attrs["global_symbol"]))
            gvar = function_cache[cache_key]
            args = [bb.emit(relax.op.reshape(tensor, shape)) for tensor, shape in (
                (q, (heads, group, dim)), (key, (heads, dim, slots)), (value, (heads, slots, dim)), (mask, (slots,)),
                (new_score, (heads, group)), (new_value, (heads, dim)))]
            y = bb.emit(relax.call_tir(gvar, args, relax.TensorType((heads, group, dim), "float32")))
            return relax.op.reshape(y, (1, heads, group, dim))

    return DecodeAttention


def _converters() -> dict:
    cache: dict = {}
    return {PANEL_MATMUL: _panel_matmul_converter(cache), QUANT_MATMUL: _quant_matmul_converter(cache),
            QUANT_GATHER: _quant_gather_converter(), PACKED_GATHER: _packed_gather_converter(),
            SPARSE_GATHER: _sparse_gather_converter(cache), DECODE_ATTENTION: _decode_attention_converter(cache),
            **tvm_import.sparse_converters(cache, sparse_kernels.KERNELS, SPARSE_MATMUL, GATED_MATMUL)}


OURS = {PANEL_MATMUL, QUANT_MATMUL, QUANT_GATHER, SPARSE_MATMUL, GATED_MATMUL, PACKED_GATHER, SPARSE_GATHER, DECODE_ATTENTION}


def unsupported_ops(model: onnx.ModelProto) -> list[str]:
    """Op types in ``model`` that cannot be compiled, sorted, each once."""
    return tvm_import.unsupported_ops(model, OURS)


def import_onnx(model: onnx.ModelProto, input_shapes: dict[str, list[int]], input_dtypes: dict[str, str]):
    """Imports a legalized model into a Relax IRModule."""
    return tvm_import.import_onnx(model, input_shapes, input_dtypes, _converters())
