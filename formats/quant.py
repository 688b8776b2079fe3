"""Quantized weight values: the value dtypes a weight may have, independent of any kernel.

A weight ``W`` [K, N] (``y = x @ W``) is quantized in groups of ``group`` consecutive
inputs ``k`` of one column (the dimension the kernels stream, so a kernel that skips an
input row still reads whole groups). With ``g(k) = k // group``, one scale ``d`` per
group and column, and the codes ``q``:

    int8    (llama.cpp's Q8_0): W[k, j] = d[g, j] * q[k, j],            q in -127..127
    int4    (Q4_1):             W[k, j] = d[g, j] * q[k, j] + m[g, j],  q in 0..15
    int4sym (Q4_0):             W[k, j] = d[g, j] * q[k, j],            q in -8..7

Scales and minimums are float16 values (held here as float32 that float16 represents
exactly), so the kernels that store them as float16 compute with exactly these numbers.
Round to nearest: every weight is within half a step of its value (int4sym, as llama.cpp's
Q4_0, clamps the far end of its grid: within one step there). Pruned zeros stay
exact zeros in ``int8`` and ``int4sym`` (zero is a code of a symmetric grid); the
asymmetric ``int4`` grid runs from the group's minimum and holds zero only by chance.

In ONNX (``onnx_nodes``) a quantized weight is standard ``DequantizeLinear`` (opset 21,
``axis`` 0, ``block_size`` = ``group``): int8 codes ``int8``, symmetric int4 codes
``int4``, and asymmetric int4 codes ``uint4`` whose float minimum, which no integer zero
point represents, is a second ``DequantizeLinear`` of an all-ones ``uint4`` tensor with
``m`` as its scale, added to the first: ``W = d q + m``.

This module imports nothing else from the project.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

#: The value dtypes ``sparsecc compile --weight-dtype`` takes, with what each stores per
#: weight (codes plus a float16 scale, and a float16 minimum for ``int4``, per group).
WEIGHT_DTYPES = {
    "fp32": "float32 values (no quantization)",
    "int8": "int8 codes, one float16 scale per group (llama.cpp's Q8_0)",
    "int4": "4-bit codes, a float16 scale and minimum per group (llama.cpp's Q4_1)",
    "int4sym": "4-bit codes -8..7, one float16 scale per group (llama.cpp's Q4_0)",
}
#: Inputs per group, the llama.cpp block.
GROUP = 32
_FP16_MAX = float(np.finfo(np.float16).max)


@dataclass(frozen=True)
class Quantized:
    """A [K, N] weight's codes and per-group parameters.

    Attributes:
        codes: [K, N], int8 (``int8``, ``int4sym``) or uint8 0..15 (``int4``).
        scales: [ceil(K / group), N] float32, each a float16 value.
        mins: like ``scales`` for ``int4``; None otherwise.
    """

    dtype: str
    group: int
    codes: np.ndarray
    scales: np.ndarray
    mins: np.ndarray | None = None

    @property
    def bits(self) -> int:
        return 8 if self.dtype == "int8" else 4

    @property
    def symmetric(self) -> bool:
        return self.mins is None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(int(d) for d in self.codes.shape)

    def dequantize(self) -> np.ndarray:
        """The float32 [K, N] weight the codes represent (as onnxruntime computes it)."""
        k = self.codes.shape[0]
        expand = lambda per_group: np.repeat(per_group, self.group, axis=0)[:k]  # noqa: E731
        dense = self.codes.astype(np.float32) * expand(self.scales)
        return dense if self.mins is None else dense + expand(self.mins)

    def nbytes(self) -> int:
        """Bytes per call a kernel reads: the codes packed (``bits`` per weight) and the
        float16 parameters."""
        k, n = self.shape
        groups = -(-k // self.group)
        return k * n * self.bits // 8 + groups * n * 2 * (1 if self.mins is None else 2)


def check_dtype(dtype: str) -> None:
    if dtype not in WEIGHT_DTYPES:
        raise ValueError(f"unknown weight dtype {dtype!r}; choose one of {', '.join(WEIGHT_DTYPES)}")


def check_group(group: int) -> None:
    if not isinstance(group, (int, np.integer)) or group <= 0 or group % 16:
        raise ValueError(f"group must be a positive multiple of 16, got {group!r}")


def fp16_rounded(values: np.ndarray, direction: float) -> np.ndarray:
    """The float16 nearest each value in ``direction`` (+inf: at or above; -inf: at or
    below), as float16; a ValueError for a value beyond float16's range."""
    if np.abs(values).max(initial=0) > _FP16_MAX:
        raise ValueError("the weight's range is too large for float16 scales")
    rounded = values.astype(np.float16)
    off = (rounded.astype(np.float64) < values) if direction > 0 else (rounded.astype(np.float64) > values)
    rounded[off] = np.nextafter(rounded[off], np.float16(direction))
    return rounded


def grouped(weight: np.ndarray, group: int, columns: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``W`` zero-padded to ``[G, group, columns]`` (float64; ``columns`` >= N, default N)
    and a mask of its real entries."""
    k, n = weight.shape
    groups, columns = -(-k // group), columns or n
    padded = np.zeros((groups * group, columns))
    padded[:k, :n] = weight
    real = np.zeros(padded.shape, dtype=bool)
    real[:k, :n] = True
    shape = (groups, group, columns)
    return padded.reshape(shape), real.reshape(shape)


def quantize_grouped(blocks: np.ndarray, real: np.ndarray, dtype: str) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Codes [G, group, C] and float16 scales (and minimums) [G, C] of ``grouped``'s blocks.

    int8: ``d`` the smallest float16 at or above ``max |w| / 127``, ``q = round(w / d)``.
    int4sym: the same with 7. int4: ``m`` the largest float16 at or below the group's
    minimum, ``d`` the smallest at or above ``(max - m) / 15``, ``q = round((w - m) / d)``.
    A step is never rounded down, so ``|q|`` stays in range and ``|w - w'| <= |d| / 2``,
    except int4sym's clamped weights (within one step).
    """
    if dtype == "int4":
        # Over the real entries only: zero padding would widen a group's range.
        lowest = np.where(real, blocks, np.inf).min(axis=1)
        highest = np.where(real, blocks, -np.inf).max(axis=1)
        padding = ~real.any(axis=1)
        lowest[padding], highest[padding] = 0, 0
        mins = fp16_rounded(lowest, -np.inf)
        scales = fp16_rounded((highest - mins.astype(np.float64)) / 15, np.inf)
        offset = blocks - mins.astype(np.float64)[:, None, :]
        limits = (0, 15)
    elif dtype == "int8":
        mins, offset = None, blocks
        scales = fp16_rounded(np.abs(blocks).max(axis=1) / 127, np.inf)
        limits = (-127, 127)
    else:
        # llama.cpp's Q4_0 rule: the group's largest magnitude w* (with its sign) is code
        # -8, d = w* / -8, so all 16 codes are used; a weight of the other sign beyond 7 d
        # is clamped (at most one step off).
        mins, offset = None, blocks
        index = np.abs(blocks).argmax(axis=1)
        extreme = np.take_along_axis(blocks, index[:, None, :], axis=1)[:, 0, :]
        magnitude = fp16_rounded(np.abs(extreme) / 8, np.inf)
        scales = np.where(extreme > 0, -magnitude, magnitude)
        limits = (-8, 7)
    step = scales.astype(np.float64)[:, None, :]
    codes = np.rint(np.divide(offset, step, out=np.zeros_like(offset), where=step != 0))
    codes = np.clip(codes, *limits).astype(np.uint8 if dtype == "int4" else np.int8)
    return codes, scales, mins


def quantize(weight: np.ndarray, dtype: str, group: int = GROUP) -> Quantized:
    """Quantizes a float32 [K, N] weight to ``dtype`` (``int8``, ``int4``, ``int4sym``).

    Raises:
        ValueError: for a weight that is not finite 2-D float32, a bad ``dtype`` or
            ``group``, or a range too large for float16 scales.
    """
    check_dtype(dtype)
    if dtype == "fp32":
        raise ValueError("fp32 is not a quantized dtype")
    check_group(group)
    if weight.ndim != 2 or weight.dtype != np.float32 or 0 in weight.shape:
        raise ValueError(f"expected a non-empty 2-D float32 weight, got {weight.ndim}-D {weight.dtype}")
    if not np.isfinite(weight).all():
        raise ValueError("the weight has infinite or NaN values")
    k, n = weight.shape
    blocks, real = grouped(weight, group)
    codes, scales, mins = quantize_grouped(blocks, real, dtype)
    return Quantized(dtype, group, codes.reshape(-1, n)[:k], scales.astype(np.float32),
                     None if mins is None else mins.astype(np.float32))


def raw_tensor(name: str, code_type: int, codes: np.ndarray) -> onnx.TensorProto:
    """An initializer of ``codes`` as ONNX stores them: one byte each for int8, two per
    byte for int4 / uint4 (element ``2 i`` in the low nibble of byte ``i``)."""
    flat = codes.ravel()
    if code_type == TensorProto.INT8:
        data = flat.astype(np.int8).tobytes()
    else:
        nibbles = (flat.astype(np.int16) & 15).astype(np.uint8)
        if nibbles.size % 2:
            nibbles = np.append(nibbles, np.uint8(0))
        data = (nibbles[0::2] | (nibbles[1::2] << 4)).tobytes()
    return helper.make_tensor(name, code_type, list(codes.shape), data, raw=True)


def ones_name(k: int, n: int) -> str:
    """The all-ones ``uint4`` tensor that carries ``int4``'s minimums, one per shape."""
    return f"sparsecc_ones_uint4_{k}x{n}"


def onnx_nodes(quantized: Quantized, output: str, prefix: str, existing: set[str]
               ) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """Nodes computing the float32 weight ``output`` from ``quantized``'s codes, and the
    initializers they read (named from ``prefix``; the all-ones tensor of ``int4`` is
    shared by every weight of its shape, so it is left out when ``existing`` holds it).
    """
    k, n = quantized.shape
    code_type = {"int8": TensorProto.INT8, "int4sym": TensorProto.INT4, "int4": TensorProto.UINT4}[quantized.dtype]
    codes = raw_tensor(f"{prefix}_codes", code_type, quantized.codes)
    inits = [codes, numpy_helper.from_array(quantized.scales, f"{prefix}_scales")]
    block = {"axis": 0, "block_size": quantized.group}
    if quantized.mins is None:
        return [helper.make_node("DequantizeLinear", [codes.name, inits[1].name], [output], name=f"{prefix}_dequantize",
                                 **block)], inits
    ones = ones_name(k, n)
    if ones not in existing:
        inits.append(raw_tensor(ones, TensorProto.UINT4, np.ones((k, n), np.uint8)))
    inits.append(numpy_helper.from_array(quantized.mins, f"{prefix}_mins"))
    nodes = [
        helper.make_node("DequantizeLinear", [codes.name, inits[1].name], [f"{prefix}_scaled"], name=f"{prefix}_dequantize",
                         **block),
        helper.make_node("DequantizeLinear", [ones, f"{prefix}_mins"], [f"{prefix}_offsets"], name=f"{prefix}_minimums",
                         **block),
        helper.make_node("Add", [f"{prefix}_scaled", f"{prefix}_offsets"], [output], name=f"{prefix}_weight"),
    ]
    return nodes, inits
