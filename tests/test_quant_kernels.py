"""The quantized matmul kernels (``targets.cpu.quant_kernels``) against onnxruntime.

The reference is standard ONNX run by onnxruntime with its graph optimisations off:
``DequantizeLinear`` (opset 21, ``block_size`` 32 along K) on the same codes and scales,
feeding a ``MatMul``. int8 codes are ``int8``, symmetric int4 codes ``int4`` (``q - 8``)
and asymmetric int4 codes ``uint4`` with no zero point; the asymmetric minimum ``m`` (a
float, which no integer zero point represents) is a second ``DequantizeLinear`` of an
all-ones ``uint4`` tensor with ``m`` as its scale, added to the first: ``W = d q + m``.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from targets.cpu import quant_kernels as qk
from conftest import onnxruntime_reference

#: (label, bits, symmetric).
KINDS = (("int8", 8, True), ("int4", 4, False), ("int4-sym", 4, True))
#: (M, K, N): K a multiple of 32 or not (the last group zero-padded), N a multiple of 16
#: or not, an even or odd number of panels (the kernel's tasks are pairs of panels), and
#: M = 1, 3 and 8 (one row tile, a partial one, and two for the vnni path's tiles of 4).
SHAPES = ((1, 64, 32), (3, 70, 21), (8, 576, 40), (1, 100, 200), (8, 160, 16))
PATHS = [
    "fma",
    pytest.param("vnni", marks=pytest.mark.skipif(not qk.vnni_available(), reason="no AVX-512 VNNI on this CPU")),
]
#: |ours - onnxruntime| <= FP32_ORDER * (|x| @ |W|), elementwise: both sum the same
#: products in float32, in different orders (groups and lanes here, onnxruntime's own
#: blocking there), so they differ by float32 rounding of partial sums, a few units of
#: 6e-8 times the sum of the products' magnitudes (measured below 3e-7 on these shapes).
FP32_ORDER = 1e-5


def _quantize(weight, bits, symmetric):
    return qk.quantize_int8(weight) if bits == 8 else qk.quantize_int4(weight, symmetric=symmetric)


def _dequantize(quantized):
    return qk.dequantize_int8(quantized) if quantized.bits == 8 else qk.dequantize_int4(quantized)


def _func(m, k, n, bits, symmetric, path):
    if bits == 8:
        return qk.int8_matmul_func(m, k, n, path=path)
    return qk.int4_matmul_func(m, k, n, symmetric=symmetric, path=path)


def _dequantize_linear_nodes(quantized) -> tuple[list, list]:
    """The nodes and initializers of ``W`` [K, N] float32 as standard ONNX."""
    return dequantize_linear_nodes(qk.unpack(quantized), quantized.bits, quantized.symmetric, quantized.group)


def dequantize_linear_nodes(unpacked, bits: int, symmetric: bool, group: int) -> tuple[list, list]:
    """The nodes and initializers computing ``W`` [K, N] float32 (output ``W``) from the
    codes, scales and minimums ``unpack`` gives, as standard ONNX."""
    codes, scales, mins = unpacked
    k, n = codes.shape
    code_type = TensorProto.INT8 if bits == 8 else (TensorProto.INT4 if symmetric else TensorProto.UINT4)
    inits = [
        helper.make_tensor("codes", code_type, [k, n], codes.astype(np.int64).ravel().tolist()),
        numpy_helper.from_array(scales, "scales"),
    ]
    block = {"axis": 0, "block_size": group}
    if mins is None:
        return [helper.make_node("DequantizeLinear", ["codes", "scales"], ["W"], **block)], inits
    inits += [helper.make_tensor("ones", TensorProto.UINT4, [k, n], [1] * (k * n)), numpy_helper.from_array(mins, "mins")]
    nodes = [
        helper.make_node("DequantizeLinear", ["codes", "scales"], ["scaled"], **block),
        helper.make_node("DequantizeLinear", ["ones", "mins"], ["offsets"], **block),
        helper.make_node("Add", ["scaled", "offsets"], ["W"]),
    ]
    return nodes, inits


def _model(quantized, m: int | None) -> onnx.ModelProto:
    """``y = x @ W`` (or, for ``m`` None, ``W`` alone) with ``W`` dequantized in ONNX."""
    nodes, inits = _dequantize_linear_nodes(quantized)
    k, n = quantized.k, quantized.n
    if m is None:
        inputs, outputs = [], [helper.make_tensor_value_info("W", TensorProto.FLOAT, [k, n])]
    else:
        nodes.append(helper.make_node("MatMul", ["x", "W"], ["y"]))
        inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [m, k])]
        outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, n])]
    graph = helper.make_graph(nodes, "quantized_matmul", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    onnx.checker.check_model(model)
    return model


def _run_kernel(func, x, quantized) -> np.ndarray:
    import tvm

    from targets.cpu.host import host_target

    symbol = str(func.attrs["global_symbol"])
    kernel = tvm.compile(tvm.IRModule({symbol: func}), target=host_target()).mod[symbol]
    y = tvm.runtime.tensor(np.zeros((x.shape[0], quantized.n), np.float32))
    kernel(tvm.runtime.tensor(x), *[tvm.runtime.tensor(a) for a in quantized.arrays()], y)
    return y.numpy()


def _case(rng, m, k, n, bits, symmetric):
    weight = (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)
    x = rng.standard_normal((m, k)).astype(np.float32)
    return x, _quantize(weight, bits, symmetric)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("label,bits,symmetric", KINDS)
@pytest.mark.parametrize("m,k,n", SHAPES)
def test_kernel_matches_onnxruntime(m, k, n, label, bits, symmetric, path):
    """Each kernel equals onnxruntime's DequantizeLinear + MatMul on the same codes, on the
    ``x`` the kernel multiplies by: ``x`` itself on the fma path, ``x`` rounded to int8 per
    group (``quantize_activations``) on the vnni path."""
    rng = np.random.default_rng(m * 1000 + k + n)
    x, quantized = _case(rng, m, k, n, bits, symmetric)
    seen = qk.quantize_activations(x) if path == "vnni" else x
    (expected,) = onnxruntime_reference(_model(quantized, m), {"x": seen})
    got = _run_kernel(_func(m, k, n, bits, symmetric, path), x, quantized)
    magnitude = np.abs(seen) @ np.abs(_dequantize(quantized))
    assert got.shape == expected.shape
    assert (np.abs(got - expected) <= FP32_ORDER * magnitude).all(), np.abs(got - expected).max()


@pytest.mark.skipif(not qk.vnni_available(), reason="no AVX-512 VNNI on this CPU")
@pytest.mark.parametrize("label,bits,symmetric", KINDS)
def test_vnni_error_from_rounding_x_is_bounded(label, bits, symmetric):
    """Against onnxruntime on the unrounded ``x``, the vnni path is off by at most what
    rounding ``x`` to int8 costs: per group ``g`` a step ``s_g = max |x| / 127``, so
    ``|x - x'| <= s_g / 2`` and ``|y - y'| <= sum_g s_g / 2 * sum_{k in g} |W[k]|``, plus
    the float32 ordering term above."""
    m, k, n = 3, 200, 48
    x, quantized = _case(np.random.default_rng(7), m, k, n, bits, symmetric)
    (expected,) = onnxruntime_reference(_model(quantized, m), {"x": x})
    got = _run_kernel(_func(m, k, n, bits, symmetric, "vnni"), x, quantized)
    dense = np.abs(_dequantize(quantized)).astype(np.float64)
    groups = -(-k // qk.GROUP)
    padded = np.zeros((m, groups * qk.GROUP))
    padded[:, :k] = np.abs(x)
    half_steps = np.repeat(padded.reshape(m, groups, qk.GROUP).max(axis=2) / 127 / 2, qk.GROUP, axis=1)[:, :k]
    bound = half_steps @ dense + FP32_ORDER * (np.abs(x) @ dense)
    error = np.abs(got - expected)
    assert (error <= bound).all()
    assert error.max() > 0  # x really was rounded: the bound is what is being tested


@pytest.mark.parametrize("label,bits,symmetric", KINDS)
def test_dequantize_equals_dequantize_linear(label, bits, symmetric):
    """``dequantize_*`` is exactly the weight onnxruntime's DequantizeLinear computes from
    the codes ``unpack`` gives (float16 scales make ``d q`` exact in float32)."""
    weight = np.random.default_rng(3).standard_normal((70, 37)).astype(np.float32)
    quantized = _quantize(weight, bits, symmetric)
    (reference,) = onnxruntime_reference(_model(quantized, None), {})
    np.testing.assert_array_equal(_dequantize(quantized), reference)


def _steps(quantized) -> np.ndarray:
    """Each weight's quantization step ``d``, [K, N]."""
    _, scales, _ = qk.unpack(quantized)
    return np.repeat(scales, quantized.group, axis=0)[: quantized.k]


@settings(max_examples=40, deadline=None)
@given(
    k=st.integers(1, 100),
    n=st.integers(1, 40),
    scale=st.floats(1e-3, 1e3),
    offset=st.floats(-2, 2),
    kind=st.sampled_from(KINDS),
    seed=st.integers(0, 2**16),
)
def test_quantization_error_is_at_most_half_a_step(k, n, scale, offset, kind, seed):
    """``|W - dequantize(quantize(W))| <= d / 2`` for every weight, ``d`` its group's step
    (plus float32's rounding of ``d q + m``, below 2**-23 of the weight's magnitude)."""
    _, bits, symmetric = kind
    weight = (np.random.default_rng(seed).standard_normal((k, n)) * scale + offset * scale).astype(np.float32)
    quantized = _quantize(weight, bits, symmetric)
    error = np.abs(_dequantize(quantized).astype(np.float64) - weight)
    steps = np.abs(_steps(quantized))
    if bits == 4 and symmetric:
        # llama.cpp's Q4_0 rule clamps the far end of the grid (code +7): one step there
        steps = np.where(qk.unpack(quantized)[0] == 7, 2 * steps, steps)
    assert (error <= steps / 2 + 2.0**-23 * np.abs(weight)).all()


def _on_grid(rng, k, n, bits, symmetric):
    """A weight whose every group is on a quantization grid the rule recovers: float16
    steps (and minimums), and codes reaching the grid's ends in each group and column."""
    groups = -(-k // qk.GROUP)
    steps = np.repeat(rng.uniform(2.0**-7, 2.0**-6, (groups, n)).astype(np.float16).astype(np.float64), qk.GROUP, 0)[:k]
    if bits == 8:
        low, high = -127, 127
    else:
        low, high = (-8, 7) if symmetric else (0, 15)
    codes = rng.integers(low, high + 1, (k, n))
    for g in range(groups):  # each group's first two rows take the extremes
        codes[g * qk.GROUP, :] = low
        if g * qk.GROUP + 1 < k:
            codes[g * qk.GROUP + 1, :] = high
    weight = steps * codes
    if bits == 4 and not symmetric:
        # Minimums of magnitude 1/8 to 1: d q + m then needs at most 18 bits, exact in float32.
        mins = rng.uniform(0.125, 1, (groups, n)) * rng.choice([-1, 1], (groups, n))
        weight = weight + np.repeat(mins.astype(np.float16).astype(np.float64), qk.GROUP, 0)[:k]
    return weight.astype(np.float32)


@pytest.mark.parametrize("label,bits,symmetric", KINDS)
@pytest.mark.parametrize("k,n", ((64, 32), (70, 21)))
def test_quantization_is_exact_on_the_grid(k, n, label, bits, symmetric):
    """A weight already on its groups' grid comes back unchanged."""
    weight = _on_grid(np.random.default_rng(k + n), k, n, bits, symmetric)
    quantized = _quantize(weight, bits, symmetric)
    np.testing.assert_array_equal(_dequantize(quantized), weight)


def test_layout_and_bytes():
    """The arrays' shapes and dtypes, and the bytes per weight of each kind: 1 + 2/32
    (int8), 0.5 + 4/32 (int4 with minimums), 0.5 + 2/32 (symmetric int4)."""
    weight = np.ones((64, 32), np.float32)
    int8 = qk.quantize_int8(weight)
    assert (int8.codes.shape, int8.codes.dtype, int8.scales.shape, int8.scales.dtype) == (
        (2, 16, 64), np.uint8, (2, 2, 16), np.float16)
    int4 = qk.quantize_int4(weight)
    assert (int4.codes.shape, int4.mins.shape) == ((2, 8, 64), (2, 2, 16))
    assert qk.quantize_int4(weight, symmetric=True).mins is None
    assert [q.nbytes / weight.size for q in (int8, int4, qk.quantize_int4(weight, symmetric=True))] == [
        1 + 2 / 32, 0.5 + 4 / 32, 0.5 + 2 / 32]


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda: qk.quantize_int8(np.ones((4, 4), np.float64)), "float32"),
        (lambda: qk.quantize_int8(np.ones((64, 4), np.float32), group=24), "multiple of 16"),
        (lambda: qk.quantize_int4(np.full((4, 4), 1e9, np.float32)), "float16"),
        (lambda: qk.int8_matmul_func(1, 0, 4), "positive"),
        (lambda: qk.int4_matmul_func(1, 64, 4, path="avx2"), "path"),
    ],
)
def test_bad_arguments_raise(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_default_path():
    """``path=None`` builds the path ``default_path`` names: fma for int8 at one row (the
    faster there, measured), vnni elsewhere where the host has it."""
    assert qk.default_path(8, 1) == "fma"
    expected = "vnni" if qk.vnni_available() else "fma"
    assert qk.default_path(8, 3) == qk.default_path(4, 1) == expected
    assert str(qk.int4_matmul_func(1, 64, 16).attrs["global_symbol"]).endswith(f"_{expected}")
    assert str(qk.int8_matmul_func(1, 64, 16).attrs["global_symbol"]).endswith("_fma")
