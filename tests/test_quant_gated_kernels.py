"""The activation-sparse quantized kernels (``targets.cpu.quant_gated_kernels``) against onnxruntime.

The reference is standard ONNX run by onnxruntime with its graph optimisations off: the
weight dequantized as in ``test_quant_kernels`` (``DequantizeLinear``, opset 21,
``block_size`` 32 along K, on the codes and scales ``unpack_gated`` gives back), the gate
as ``Abs``, ``Greater`` (against the threshold), ``Cast`` to float and ``Mul`` with ``x``,
then ``MatMul``.
"""

from __future__ import annotations

import functools

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from targets.cpu import quant_gated_kernels as qg
from targets.cpu import quant_kernels as qk
from conftest import onnxruntime_reference
from test_quant_kernels import dequantize_linear_nodes

#: (label, bits, symmetric).
KINDS = (("int8", 8, True), ("int4", 4, False), ("int4-sym", 4, True))
#: (M, K, N): M = 1, 3 and 8; K not a multiple of the group of 32 (the last group short);
#: N not a multiple of 16 (and, for 21 and 200 columns, of 32: an int4 row's last byte
#: vector half padding), with rows shorter and (8300 columns) longer than the kernel's
#: prefetch distance of 4 KB.
SHAPES = ((1, 40, 8300), (3, 100, 21), (8, 70, 200))
#: Fractions of inactive inputs: None for a threshold of 0 (relu-like: |x| > 0 everywhere,
#: none skipped), 1.0 for a threshold above every |x| (all skipped), 0.5 for a random half.
ACTIVITY = (None, 0.5, 1.0)
#: |ours - onnxruntime| <= FP32_ORDER * (|gate(x)| @ (|d q| + |m|)), elementwise: both sum
#: the same products in float32, in different orders, and the kernel applies a group's
#: scale and minimum once to a few inputs' sum (d sum_j g_j q_j + m sum_j g_j), so its
#: rounding is relative to those terms' magnitudes rather than to |W| (measured below 5e-7
#: of it on these shapes).
FP32_ORDER = 1e-5


def _quantize(weight, bits, symmetric):
    return qk.quantize_int8(weight) if bits == 8 else qk.quantize_int4(weight, symmetric=symmetric)


@functools.lru_cache(maxsize=None)
def _func(m, k, n, bits, symmetric, per_channel):
    """Built once per kernel (the TVMScript takes seconds to parse): the threshold is an
    input, so every activity reuses it."""
    if bits == 8:
        return qg.gated_int8_matmul_func(m, k, n, per_channel=per_channel)
    return qg.gated_int4_matmul_func(m, k, n, symmetric=symmetric, per_channel=per_channel)


@functools.lru_cache(maxsize=None)
def _kernel(m, k, n, bits, symmetric, per_channel):
    import tvm

    from targets.cpu.host import host_target

    func = _func(m, k, n, bits, symmetric, per_channel)
    symbol = str(func.attrs["global_symbol"])
    return tvm.compile(tvm.IRModule({symbol: func}), target=host_target()).mod[symbol]


def _run(x, threshold, packed, per_channel=True) -> np.ndarray:
    import tvm

    kernel = _kernel(x.shape[0], packed.k, packed.n, packed.bits, packed.symmetric, per_channel)
    y = tvm.runtime.tensor(np.full((x.shape[0], packed.n), np.nan, np.float32))
    kernel(tvm.runtime.tensor(x), tvm.runtime.tensor(threshold), *[tvm.runtime.tensor(a) for a in packed.arrays()], y)
    return y.numpy()


def _model(packed, m: int, threshold_size: int) -> onnx.ModelProto:
    """``y = gate(x) @ W`` with ``W`` dequantized and the gate written in standard ops."""
    nodes, inits = dequantize_linear_nodes(qg.unpack_gated(packed), packed.bits, packed.symmetric, packed.group)
    nodes += [
        helper.make_node("Abs", ["x"], ["magnitude"]),
        helper.make_node("Greater", ["magnitude", "threshold"], ["is_active"]),
        helper.make_node("Cast", ["is_active"], ["keep"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["x", "keep"], ["gated"]),
        helper.make_node("MatMul", ["gated", "W"], ["y"]),
    ]
    inputs = [
        helper.make_tensor_value_info("x", TensorProto.FLOAT, [m, packed.k]),
        helper.make_tensor_value_info("threshold", TensorProto.FLOAT, [threshold_size]),
    ]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, packed.n])]
    graph = helper.make_graph(nodes, "gated_quantized_matmul", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    onnx.checker.check_model(model)
    return model


def _threshold(x, inactive, per_channel, rng) -> np.ndarray:
    k = x.shape[1]
    if inactive is None:
        level = 0.0
    elif inactive == 1.0:
        level = float(np.abs(x).max()) + 1.0
    else:
        level = float(np.quantile(np.abs(x), inactive))
    if not per_channel:
        return np.array([level], np.float32)
    # Per channel: the same level, jittered (but never below 0 or under the maximum).
    jitter = rng.uniform(0.8, 1.2, k) if inactive == 0.5 else np.ones(k)
    return (level * jitter).astype(np.float32)


def _magnitude(gated, packed) -> np.ndarray:
    """``|gate(x)| @ (|d q| + |m|)``: the scale of the float32 rounding (see FP32_ORDER)."""
    codes, scales, mins = qg.unpack_gated(packed)
    expand = lambda per_group: np.repeat(per_group, packed.group, axis=0)[: packed.k]  # noqa: E731
    terms = np.abs(codes.astype(np.float32) * expand(scales))
    if mins is not None:
        terms = terms + np.abs(expand(mins))
    return np.abs(gated) @ terms


def _case(m, k, n, bits, symmetric, seed):
    rng = np.random.default_rng(seed)
    weight = (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)
    x = rng.standard_normal((m, k)).astype(np.float32)
    return rng, x, qg.pack_gated(_quantize(weight, bits, symmetric))


@pytest.mark.parametrize("inactive", ACTIVITY, ids=("threshold0", "half", "all"))
@pytest.mark.parametrize("label,bits,symmetric", KINDS)
@pytest.mark.parametrize("m,k,n", SHAPES)
def test_kernel_matches_onnxruntime(m, k, n, label, bits, symmetric, inactive):
    rng, x, packed = _case(m, k, n, bits, symmetric, seed=m * 1000 + k + n)
    threshold = _threshold(x, inactive, True, rng)
    (expected,) = onnxruntime_reference(_model(packed, m, k), {"x": x, "threshold": threshold})
    got = _run(x, threshold, packed)
    gated = np.where(np.abs(x) > threshold, x, 0)
    if inactive == 1.0:
        assert not gated.any() and not expected.any()  # the case is what it says
    if inactive is None:
        assert (gated == x).all()
    assert (np.abs(got - expected) <= FP32_ORDER * _magnitude(gated, packed)).all(), np.abs(got - expected).max()


def test_one_threshold_for_all_inputs():
    """``per_channel=False``: the threshold is ``[1]``, broadcast by ONNX's ``Greater`` (on
    int4 with minimums; the gate does not depend on the dtype)."""
    m, k, n = 3, 100, 21
    rng, x, packed = _case(m, k, n, 4, False, seed=5)
    threshold = _threshold(x, 0.5, False, rng)
    (expected,) = onnxruntime_reference(_model(packed, m, 1), {"x": x, "threshold": threshold})
    got = _run(x, threshold, packed, per_channel=False)
    gated = np.where(np.abs(x) > threshold, x, 0)
    assert (np.abs(got - expected) <= FP32_ORDER * _magnitude(gated, packed)).all()


def test_input_is_skipped_only_when_inactive_in_every_row():
    """Input 5 is active in row 2 only: its weights must reach row 2, and nothing else may."""
    m, k, n = 3, 100, 21
    _, _, packed = _case(m, k, n, 8, True, seed=1)
    x = np.full((m, k), 0.01, np.float32)
    x[2, 5] = 2.0
    threshold = np.full(k, 0.5, np.float32)
    codes, scales, _ = qg.unpack_gated(packed)
    expected = np.zeros((m, n), np.float32)
    expected[2] = 2.0 * codes[5].astype(np.float32) * scales[0]
    np.testing.assert_allclose(_run(x, threshold, packed), expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("label,bits,symmetric", KINDS)
@pytest.mark.parametrize("k,n", ((70, 21), (64, 40), (33, 200)))
def test_packing_keeps_the_codes(k, n, label, bits, symmetric):
    """``unpack_gated(pack_gated(W))`` is exactly ``quant_kernels.unpack(W)``: the gated and
    the dense kernels compute with the same quantized weight. The arrays have the documented
    shapes and dtypes, so the bytes per weight are those of the dense layout."""
    weight = np.random.default_rng(k + n).standard_normal((k, n)).astype(np.float32)
    quantized = _quantize(weight, bits, symmetric)
    packed = qg.pack_gated(quantized)
    for got, expected in zip(qg.unpack_gated(packed), qk.unpack(quantized)):
        if expected is None:
            assert got is None
        else:
            assert got.dtype == expected.dtype
            np.testing.assert_array_equal(got, expected)
    padded = -(-n // qg.ROW_ALIGN[bits]) * qg.ROW_ALIGN[bits]
    groups = -(-k // qg.GROUP)
    assert (packed.codes.shape, packed.codes.dtype) == ((k, padded * bits // 8), np.int8 if bits == 8 else np.uint8)
    assert (packed.scales.shape, packed.scales.dtype) == ((groups, padded), np.float16)
    assert (packed.mins is None) == (bits == 8 or symmetric)


def test_symbols_read_back():
    """Each kernel names itself with ``kernel_symbol``, and ``parse_kernel_symbol`` gives the
    facts back (None for another kernel's name)."""
    for bits, symmetric, per_channel in ((8, True, True), (4, False, False), (4, True, True)):
        name = str(_func(3, 100, 21, bits, symmetric, per_channel).attrs["global_symbol"])
        assert name == qg.kernel_symbol(bits, symmetric, 3, 100, 21, 32, per_channel)
        assert qg.parse_kernel_symbol(name) == {"bits": bits, "symmetric": symmetric, "m": 3, "k": 100, "n": 21,
                                                "group": 32, "per_channel": per_channel}
    assert qg.parse_kernel_symbol("gated_matmul_m1_k4_n4_channel") is None


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda: qg.gated_int8_matmul_func(1, 0, 4), "positive"),
        (lambda: qg.gated_int4_matmul_func(1, 64, 4, group=24), "multiple of 16"),
        (lambda: qg.gated_int8_matmul_func(1, 64, 4, per_channel="yes"), "bool"),
        (lambda: qg.gated_int8_matmul_func(1, 64, 4, k_parts=0), "positive"),
        (lambda: qg.quantize_gated_int8(np.ones((4, 4), np.float64)), "float32"),
    ],
)
def test_bad_arguments_raise(call, message):
    with pytest.raises(ValueError, match=message):
        call()
