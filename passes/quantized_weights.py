"""Read quantized weights from a graph, as the ``formats.quant`` descriptions the kernels take.

``quantized_weight`` recognises a [K, N] MatMul weight computed from constant codes in the
forms ``passes.quantize_weights`` writes (``DequantizeLinear`` with ``block_size`` along K;
for int4's minimum, plus a second ``DequantizeLinear`` of all-ones codes) and in those
other tools write (integer zero points, ``uint8`` codes around 128, per-column or
per-tensor scales); ``matmul_nbits_weight`` does the same for onnxruntime's
``com.microsoft.MatMulNBits``. A form no kernel dtype holds comes back as its float32
weight (``Dequantized``), with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from formats import quant
from passes.base import Graph, attribute


def _integers(graph: Graph, name: str) -> tuple[np.ndarray, int] | None:
    """A constant integer tensor as int16 values, with its ONNX type."""
    init = graph.initializers.get(name)
    if init is None:
        return None
    return numpy_helper.to_array(init).astype(np.int16), init.data_type


def _dequantize_parts(node: onnx.NodeProto, graph: Graph) -> tuple | str:
    """The constant codes, scales per (group, column), zero points and group of a
    ``DequantizeLinear`` producing a [K, N] weight along K, or why not."""
    if node.op_type != "DequantizeLinear" or node.domain not in ("", "ai.onnx"):
        return f"it is computed by a {node.op_type} node"
    found = _integers(graph, node.input[0])
    scale = graph.constant(node.input[1]) if len(node.input) > 1 else None
    if found is None or scale is None:
        return "its DequantizeLinear does not read constants"
    codes, code_type = found
    if codes.ndim != 2:
        return f"its codes are {codes.ndim}-D"
    k, n = codes.shape
    zero = _integers(graph, node.input[2]) if len(node.input) > 2 and node.input[2] else (np.zeros((), np.int16), code_type)
    if zero is None:
        return "its zero point is not a constant"
    axis, block = attribute(node, "axis", 1), attribute(node, "block_size", 0)
    axis = axis + 2 if axis < 0 else axis
    scale = scale.astype(np.float64)
    zero_point = zero[0]
    if scale.ndim == 0 or scale.size == 1:  # per tensor: one group of the whole of K
        group, scale, zero_point = -(-k // 16) * 16, np.full((1, n), scale.item()), np.full((1, n), zero_point.item())
    elif block and axis == 0 and scale.shape == (-(-k // block), n):
        group = int(block)
    elif not block and axis == 1 and scale.shape == (n,):  # per output column
        group, scale, zero_point = -(-k // 16) * 16, scale[None, :], np.broadcast_to(zero_point, (n,))[None, :]
    else:
        return f"its scales ({list(scale.shape)}, axis {axis}, block_size {block}) are not per group of inputs"
    if group % 16:
        return f"its groups of {group} inputs are not a multiple of 16"
    return codes, code_type, scale, np.broadcast_to(zero_point, scale.shape).astype(np.float64), group


def _as_fp16(values: np.ndarray) -> tuple[np.ndarray, bool] | None:
    """``values`` rounded to float16 (as float32), and whether that was exact; None when
    float16 cannot hold them."""
    if not np.isfinite(values).all() or np.abs(values).max(initial=0) > float(np.finfo(np.float16).max):
        return None
    rounded = values.astype(np.float16).astype(np.float32)
    return rounded, bool(np.array_equal(rounded.astype(np.float64), values))


@dataclass(frozen=True)
class Dequantized:
    """A quantized weight no kernel dtype holds, as float32 [K, N], and why."""

    weight: np.ndarray
    reason: str


def _dequantized(codes, scale, zero, group, minimum, reason: str) -> Dequantized:
    k = codes.shape[0]
    expand = lambda per_group: np.repeat(per_group, group, axis=0)[:k]  # noqa: E731
    weight = (codes - expand(zero)) * expand(scale) + (0 if minimum is None else expand(minimum))
    return Dequantized(weight.astype(np.float32), reason)


def _described(codes: np.ndarray, code_type: int, scale: np.ndarray, zero: np.ndarray, group: int,
               minimum: np.ndarray | None = None) -> tuple[quant.Quantized, bool] | Dequantized:
    """The ``formats.quant`` description of ``W = (q - zero) * scale [+ minimum]`` and
    whether it is exact (float16 scales), or the float32 weight where no kernel dtype
    holds it."""
    eight = code_type in (TensorProto.INT8, TensorProto.UINT8)
    signed = code_type in (TensorProto.INT8, TensorProto.INT4)
    shift = np.unique(zero)
    if eight:
        if minimum is not None or shift.size != 1 or shift[0] != (0 if signed else 128):
            return _dequantized(codes, scale, zero, group, minimum,
                                "its 8-bit zero points are not the symmetric 0 (or 128 for uint8)")
        # The kernel stores code + 128 in a byte, so -128 fits as well.
        dtype, values, mins = "int8", codes - int(shift[0]), None
    elif minimum is None and shift.size == 1 and shift[0] == (0 if signed else 8):
        dtype, values, mins = "int4sym", codes - int(shift[0]), None
    else:
        dtype, values = "int4", codes + (8 if signed else 0)
        mins = (minimum if minimum is not None else 0) - scale * (zero + (8 if signed else 0))
    fp16_scale = _as_fp16(scale)
    fp16_mins = _as_fp16(np.asarray(mins, np.float64)) if mins is not None else (None, True)
    if fp16_scale is None or fp16_mins is None:
        return _dequantized(codes, scale, zero, group, minimum, "its scales are beyond float16's range")
    exact = fp16_scale[1] and fp16_mins[1]
    values = values.astype(np.uint8 if dtype == "int4" else np.int8)
    return quant.Quantized(dtype, group, values, fp16_scale[0], fp16_mins[0]), exact


def quantized_weight(name: str, graph: Graph) -> tuple[quant.Quantized, bool] | Dequantized | str | None:
    """The quantized weight that computes ``name`` (a [K, N] MatMul weight) and whether
    its description is exact; a ``Dequantized`` weight where no kernel dtype holds it; why
    it cannot be read (a string); None when ``name`` is no ``DequantizeLinear`` output."""
    producer = graph.producers.get(name)
    if producer is None:
        return None
    if producer.op_type == "Add" and producer.domain in ("", "ai.onnx"):
        parts = [graph.producers.get(operand) for operand in producer.input]
        if not all(part is not None and part.op_type == "DequantizeLinear" for part in parts):
            return None
        scaled, offsets = (_dequantize_parts(part, graph) for part in parts)
        if isinstance(scaled, str) or isinstance(offsets, str):
            return scaled if isinstance(scaled, str) else offsets
        ones, _, minimum, offset_zero, offset_group = offsets
        if ones.shape != scaled[0].shape or np.any(ones != 1) or np.any(offset_zero != 0) or offset_group != scaled[4]:
            return "its Add of two DequantizeLinear is not codes plus per-group minimums"
        return _described(*scaled[:4], scaled[4], minimum=minimum)
    if producer.op_type != "DequantizeLinear":
        return None
    parts = _dequantize_parts(producer, graph)
    return parts if isinstance(parts, str) else _described(*parts)


def matmul_nbits_weight(node: onnx.NodeProto, graph: Graph) -> tuple[quant.Quantized, bool] | Dequantized | str:
    """The [K, N] weight of a ``com.microsoft.MatMulNBits`` node (``y = x @ W``; B holds
    ``W^T`` in blocks along K, two 4-bit codes per byte, low nibble first; default zero
    point 8, or 128 at 8 bits), or why it cannot be read."""
    k, n = int(attribute(node, "K")), int(attribute(node, "N"))
    bits, block = int(attribute(node, "bits", 4)), int(attribute(node, "block_size"))
    if bits not in (4, 8):
        return f"its weights have {bits} bits; the kernels take 4 and 8"
    if len(node.input) > 4 and node.input[4]:
        return "it has a g_idx input (reordered groups)"
    packed, scales = graph.constant(node.input[1]), graph.constant(node.input[2])
    if packed is None or scales is None:
        return "its weight or scales are not constants"
    blocks = -(-k // block)
    if block % 16 or packed.size != n * blocks * block * bits // 8 or scales.size != n * blocks:
        return f"its arrays do not match K={k}, N={n}, block_size={block}"
    raw = packed.reshape(n, blocks * block * bits // 8).astype(np.uint8)
    if bits == 4:
        raw = np.stack([raw & 15, raw >> 4], axis=-1).reshape(n, blocks * block)
    codes = raw[:, :k].T.astype(np.int16)
    scale = scales.astype(np.float64).reshape(n, blocks).T
    zero = np.full(scale.shape, 8.0 if bits == 4 else 128.0)
    if len(node.input) > 3 and node.input[3]:
        zeros = graph.constant(node.input[3])
        if zeros is None:
            return "its zero points are not constants"
        if np.issubdtype(zeros.dtype, np.floating):
            zero = zeros.astype(np.float64).reshape(n, blocks).T
            # A float zero point: W = (q - z) d = d q + m with the minimum m = -z d.
            return _described(codes, TensorProto.UINT4 if bits == 4 else TensorProto.UINT8, scale, np.zeros_like(scale),
                              block, minimum=-zero * scale)
        zeros = zeros.astype(np.uint8).reshape(n, -1)
        if bits == 4:
            zeros = np.stack([zeros & 15, zeros >> 4], axis=-1).reshape(n, -1)
        zero = zeros[:, :blocks].T.astype(np.float64)
    return _described(codes, TensorProto.UINT4 if bits == 4 else TensorProto.UINT8, scale, zero, block)
