"""Quantized weights through the compiler: ``formats.quant``, ``passes.quantize_weights``,
and ``compile --weight-dtype`` / quantized ONNX inputs against onnxruntime.

The reference is onnxruntime (graph optimisations off) on the same quantized graph:
standard ``DequantizeLinear`` (opset 21, ``block_size`` 32) or onnxruntime's own
``com.microsoft.MatMulNBits``. On one layer the tolerance is float32 summation order; the
``vnni`` path (int4, and int8 above one row) multiplies ``x`` rounded per group to int8,
so its reference is onnxruntime on that rounded ``x``
(``targets.cpu.quant_kernels.quantize_activations``). Whole models compound that
rounding; their tolerance is written where they are checked.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import runtime
from compiler.driver import CompileOptions, compile_model
from conftest import onnxruntime_reference
from formats import quant
from passes.base import Graph
from passes.quantize_weights import quantize_weights
from passes.quantized_weights import Dequantized, matmul_nbits_weight, quantized_weight
from runtime.errors import SparseccError
from targets.cpu import quant_kernels as qk

DTYPES = ("int8", "int4", "int4sym")
#: |ours - onnxruntime| <= FP32_ORDER * (|x| @ |W|): the same products summed in another
#: order (as in tests/test_quant_kernels.py).
FP32_ORDER = 1e-5


def _matmul_model(weight: np.ndarray, rows: int, gemm: bool = False) -> onnx.ModelProto:
    k, n = weight.shape
    if gemm:  # y = x @ B^T + C
        node = helper.make_node("Gemm", ["x", "W", "C"], ["y"], transB=1, name="layer")
        inits = [numpy_helper.from_array(np.ascontiguousarray(weight.T), "W"),
                 numpy_helper.from_array(np.linspace(-1, 1, n).astype(np.float32), "C")]
    else:
        node = helper.make_node("MatMul", ["x", "W"], ["y"], name="layer")
        inits = [numpy_helper.from_array(weight, "W")]
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [rows, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [rows, n])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    return model


def _weight(k: int, n: int, seed: int = 0, pruned: float = 0.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    weight = rng.standard_normal((k, n)).astype(np.float32) * 0.1
    weight[rng.random((k, n)) < pruned] = 0
    return weight


def _bound(x: np.ndarray, weight: np.ndarray) -> np.ndarray:
    return FP32_ORDER * (np.abs(x) @ np.abs(weight)) + 1e-6


def _seen(x: np.ndarray, dtype: str) -> np.ndarray:
    """The ``x`` the kernel multiplies: rounded per group where it runs the vnni path."""
    bits = 8 if dtype == "int8" else 4
    return qk.quantize_activations(x) if qk.default_path(bits, x.shape[0]) == "vnni" else x


# --- formats.quant --------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_is_within_half_a_step_and_runs_in_onnxruntime(dtype):
    weight = _weight(70, 40, pruned=0.3)
    quantized = quant.quantize(weight, dtype)
    steps = np.abs(np.repeat(quantized.scales, 32, axis=0)[:70])
    if dtype == "int4sym":  # llama.cpp's Q4_0 rule clamps the far end of the grid: one step
        steps = np.where(quantized.codes == 7, 2 * steps, steps)
    assert np.all(np.abs(quantized.dequantize() - weight) <= steps / 2 * (1 + 1e-6) + 1e-12)
    # float16 parameters, held exactly
    assert np.array_equal(quantized.scales.astype(np.float16).astype(np.float32), quantized.scales)
    if dtype != "int4":  # symmetric grids hold zero: pruned weights stay zero
        assert np.all(quantized.dequantize()[weight == 0] == 0)
    nodes, inits = quant.onnx_nodes(quantized, "W", "w", set())
    graph = helper.make_graph(nodes, "g", [], [helper.make_tensor_value_info("W", TensorProto.FLOAT, [70, 40])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    onnx.checker.check_model(model, full_check=True)
    np.testing.assert_array_equal(onnxruntime_reference(model, {})[0], quantized.dequantize())


def test_quantize_refuses_bad_weights():
    with pytest.raises(ValueError, match="unknown weight dtype"):
        quant.quantize(_weight(32, 16), "int3")
    with pytest.raises(ValueError, match="NaN"):
        quant.quantize(np.full((32, 16), np.nan, np.float32), "int8")
    with pytest.raises(ValueError, match="float16"):
        quant.quantize(np.full((32, 16), 1e9, np.float32), "int8")


@pytest.mark.parametrize("dtype", DTYPES)
def test_kernel_layout_round_trips(dtype):
    """``quant_kernels.pack`` of a description equals quantizing in the kernel's own layout,
    and ``unpack`` gives the description's codes back."""
    weight = _weight(100, 37)
    quantized = quant.quantize(weight, dtype)
    packed = qk.pack(quantized)
    direct = qk.quantize_int8(weight) if dtype == "int8" else qk.quantize_int4(weight, symmetric=dtype == "int4sym")
    for ours, theirs in zip(packed.arrays(), direct.arrays()):
        np.testing.assert_array_equal(ours, theirs)
    codes, scales, mins = qk.unpack(packed)
    np.testing.assert_array_equal(codes, quantized.codes)
    np.testing.assert_array_equal(scales, quantized.scales)


# --- the pass -----------------------------------------------------------------------


def test_pass_rewrites_matmul_and_gemm_into_dequantize_linear():
    """Before: ``y = MatMul(x, W)`` and ``Gemm(x, B, C, transB=1)``. Expected: ``MatMul(x,
    DequantizeLinear(codes, scales))`` (plus ``Add`` of C), opset 21, the same function up
    to the quantization."""
    for gemm in (False, True):
        weight = _weight(64, 48)
        model = _matmul_model(weight, 2, gemm)
        x = np.random.default_rng(1).standard_normal((2, 64)).astype(np.float32)
        expected = onnxruntime_reference(model, {"x": x})[0]
        result = quantize_weights(model, "int8")
        ops = [node.op_type for node in result.model.graph.node]
        assert ops == ["DequantizeLinear", "MatMul"] + (["Add"] if gemm else [])
        assert next(o.version for o in result.model.opset_import if o.domain == "") == 21
        got = onnxruntime_reference(result.model, {"x": x})[0]
        quantized = quant.quantize(weight, "int8")
        np.testing.assert_allclose(got, x @ quantized.dequantize() + (np.linspace(-1, 1, 48) if gemm else 0),
                                   atol=1e-5, rtol=1e-5)
        assert 0 < np.abs(got - expected).max() < 0.05


def test_pass_overrides_and_refusals():
    model = _matmul_model(_weight(64, 48), 1)
    kept = quantize_weights(model, "int4", overrides={"W": "fp32"})
    assert not kept.modified
    with pytest.raises(SparseccError, match="no linear layer or weight.*nope"):
        quantize_weights(_matmul_model(_weight(64, 48), 1), "int4", overrides={"nope": "int8"})


def test_reading_back_every_form():
    """Our own forms read back exactly; other tools' forms (uint4 with integer zero points,
    uint8 around 128, per-column int8) read back as the weight onnxruntime computes."""
    weight = _weight(64, 48)
    for dtype in DTYPES:
        model = quantize_weights(_matmul_model(weight, 1), dtype).model
        graph = Graph(model.graph)
        found, exact = quantized_weight(model.graph.node[-1].input[1], graph)
        assert exact and found.dtype == dtype
        np.testing.assert_array_equal(found.dequantize(), quant.quantize(weight, dtype).dequantize())

    def read(codes, code_type, scale, zero=None, **attrs):
        inits = [helper.make_tensor("q", code_type, list(codes.shape), codes.astype(np.int64).ravel().tolist()),
                 numpy_helper.from_array(scale.astype(np.float32), "s")]
        inputs = ["q", "s"]
        if zero is not None:
            inits.append(helper.make_tensor("z", code_type, list(zero.shape), zero.astype(np.int64).ravel().tolist()))
            inputs.append("z")
        node = helper.make_node("DequantizeLinear", inputs, ["W"], **attrs)
        model = helper.make_model(helper.make_graph([node], "g", [], [helper.make_tensor_value_info("W", 1, list(codes.shape))],
                                                    inits), opset_imports=[helper.make_opsetid("", 21)])
        model.ir_version = 10
        return quantized_weight("W", Graph(model.graph)), onnxruntime_reference(model, {})[0]

    rng = np.random.default_rng(2)
    scale = (rng.random((2, 48)) * 0.1 + 0.01).astype(np.float16).astype(np.float32)
    cases = [
        (rng.integers(0, 16, (64, 48)), TensorProto.UINT4, scale, rng.integers(0, 16, (2, 48)), "int4"),
        (rng.integers(0, 256, (64, 48)), TensorProto.UINT8, scale, np.full((2, 48), 128), "int8"),
        (rng.integers(-8, 8, (64, 48)), TensorProto.INT4, scale, None, "int4sym"),
    ]
    for codes, code_type, s, zero, dtype in cases:
        (found, _), reference = read(codes, code_type, s, zero, axis=0, block_size=32)
        assert found.dtype == dtype
        # an integer zero point becomes the minimum -d z, rounded to float16: within
        # 2^-11 of |d z| <= 15 d
        np.testing.assert_allclose(found.dequantize(), reference, rtol=0, atol=2 ** -11 * 15 * s.max() * 1.01)
    per_column = (rng.random(48) * 0.1).astype(np.float16).astype(np.float32)
    (found, exact), reference = read(rng.integers(-127, 128, (64, 48)), TensorProto.INT8, per_column, None, axis=1)
    assert found.dtype == "int8" and found.group == 64 and exact
    np.testing.assert_array_equal(found.dequantize(), reference)
    fallback, reference = read(rng.integers(0, 256, (64, 48)), TensorProto.UINT8, scale, rng.integers(0, 256, (2, 48)),
                               axis=0, block_size=32)
    assert isinstance(fallback, Dequantized) and "zero points" in fallback.reason
    np.testing.assert_allclose(fallback.weight, reference, rtol=1e-6)


# --- compiled against onnxruntime ------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 5])
def test_compiled_quantized_layer_matches_onnxruntime(tmp_path, dtype, rows):
    weight = _weight(96, 40, pruned=0.5)
    source = tmp_path / "layer.onnx"
    onnx.save(_matmul_model(weight, rows), source)
    artifact = tmp_path / "layer.sccx"
    summary = compile_model(CompileOptions(str(source), str(artifact), weight_dtype=dtype, explain=True))
    assert any(f"-> {dtype} kernel" in line for line in summary["explanations"])
    model = runtime.load(artifact)
    assert model.manifest.summary["weight_dtype"] == dtype
    x = np.random.default_rng(3).standard_normal((rows, 96)).astype(np.float32)
    quantized_graph = quantize_weights(_matmul_model(weight, rows), dtype).model
    reference = onnxruntime_reference(quantized_graph, {"x": _seen(x, dtype)})[0]
    assert np.all(np.abs(model.run({"x": x})["y"] - reference) <= _bound(_seen(x, dtype), weight))
    # the weights stored are the quantized ones, in the kernel's layout
    assert model.manifest.summary["weight_bytes"] == qk.pack(quant.quantize(weight, dtype)).nbytes


@pytest.mark.parametrize("symmetric,bits", [(True, 4), (False, 4), (True, 8)])
def test_onnxruntime_matmul_nbits_models_compile(tmp_path, symmetric, bits):
    """A model quantized by onnxruntime's own tool keeps its quantization."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    weight = _weight(96, 40, seed=4)
    quantizer = MatMulNBitsQuantizer(_matmul_model(weight, 1), block_size=32, is_symmetric=symmetric, bits=bits)
    quantizer.process()
    source = tmp_path / "nbits.onnx"
    onnx.save(quantizer.model.model, source)
    node = next(n for n in quantizer.model.model.graph.node if n.op_type == "MatMulNBits")
    found, _ = matmul_nbits_weight(node, Graph(quantizer.model.model.graph))
    summary = compile_model(CompileOptions(str(source), str(tmp_path / "nbits.sccx"), explain=True))
    assert any(f"-> {found.dtype} kernel" in line for line in summary["explanations"])
    x = np.random.default_rng(5).standard_normal((1, 96)).astype(np.float32)
    ours = runtime.load(tmp_path / "nbits.sccx").run({"x": x})["y"]
    reference = onnxruntime_reference(source, {"x": _seen(x, found.dtype)})[0]
    # onnxruntime's scales are float32; the kernel holds them in float16 (2^-11 relative)
    tolerance = _bound(_seen(x, found.dtype), weight) + 2 ** -10 * (np.abs(_seen(x, found.dtype)) @ np.abs(weight))
    assert np.all(np.abs(ours - reference) <= tolerance)


def test_tiny_llama_int4_matches_onnxruntime_on_its_quantized_graph(tmp_path, exported):
    """A whole quantized model: logits within 3 % of their range of onnxruntime on the
    quantized graph (the vnni path's rounding of x, compounded over the layers), and
    clearly closer to it than to the float32 model."""
    from compiler.driver import random_inputs
    from compiler.onnx_io import load_model

    source = exported("tiny-llama", seq_len=8)
    dump = tmp_path / "dump"
    compile_model(CompileOptions(str(source), str(tmp_path / "q.sccx"), weight_dtype="int4", dump_dir=str(dump)))
    feeds = random_inputs(load_model(source))
    quantized_graph = sorted(dump.glob("*-guard_gather_indices.onnx"))[0]
    reference = onnxruntime_reference(quantized_graph, feeds)[0]
    fp32 = onnxruntime_reference(source, feeds)[0]
    ours = runtime.load(tmp_path / "q.sccx").run(feeds)["logits"]
    scale = np.abs(reference).max()
    assert np.abs(ours - reference).max() <= 0.03 * scale
    assert np.abs(ours - reference).max() < 0.5 * np.abs(fp32 - reference).max()


def test_bad_weight_dtype_options_are_refused(tmp_path, capsys):
    from compiler.cli import main

    source = tmp_path / "layer.onnx"
    onnx.save(_matmul_model(_weight(64, 32), 1), source)
    output = str(tmp_path / "a.sccx")
    for extra, message in ((["--weight-dtype", "int3"], "int3"), (["--weight-dtype-for", "W=int9"], "NAME=DTYPE"),
                           (["--weight-dtype-for", "nope=int8"], "nope")):
        with pytest.raises(SystemExit) as exit_:
            main(["compile", str(source), "-o", output, *extra])
        captured = capsys.readouterr()
        assert exit_.value.code != 0 and message in captured.err and "Traceback" not in captured.err
        assert not (tmp_path / "a.sccx").exists()


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_tied_table_is_stored_once_quantized(tmp_path, dtype):
    """Before: ``h = Gather(E, ids)``, ``logits = h @ Transpose(E)``. The quantized model
    looks up rows of the quantized projection (``Gather(Transpose(W'), ids)``), and the
    artifact stores only the projection's codes and parameters, which the lookup reads."""
    rng = np.random.default_rng(8)
    table = (rng.standard_normal((80, 64)) * 0.1).astype(np.float32)
    nodes = [helper.make_node("Gather", ["table", "ids"], ["h"], name="embed"),
             helper.make_node("Transpose", ["table"], ["table_t"], perm=[1, 0], name="project_t"),
             helper.make_node("MatMul", ["h", "table_t"], ["logits"], name="project")]
    graph = helper.make_graph(nodes, "tied", [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 4])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 4, 80])],
                              [numpy_helper.from_array(table, "table")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.save(model, tmp_path / "tied.onnx")
    dump = tmp_path / "dump"
    summary = compile_model(CompileOptions(str(tmp_path / "tied.onnx"), str(tmp_path / "t.sccx"), weight_dtype=dtype,
                                           explain=True, dump_dir=str(dump)))
    assert any("embed reads the embedding rows from the stored" in line for line in summary["explanations"])
    artifact = runtime.load(tmp_path / "t.sccx")
    assert artifact.manifest.summary["weight_bytes"] == qk.pack(quant.quantize(np.ascontiguousarray(table.T), dtype)).nbytes
    feeds = {"ids": rng.integers(0, 80, (1, 4)).astype(np.int64)}
    reference_graph = sorted(dump.glob("*-guard_gather_indices.onnx"))[0]
    reference = onnxruntime_reference(reference_graph, feeds)[0]
    quantized = quant.quantize(np.ascontiguousarray(table.T), dtype).dequantize()
    h = quantized.T[feeds["ids"][0]]
    # the lookup is exact; the projection rounds h per group of 32 on the vnni path
    rounding = (np.abs(h).max() / 254) * np.abs(quantized).sum(axis=0) if qk.default_path(
        8 if dtype == "int8" else 4, 4) == "vnni" else 0
    assert np.all(np.abs(artifact.run(feeds)["logits"] - reference) <= _bound(h, quantized) + rounding)


def test_sparsify_quantize_writes_standard_onnx_that_compile_keeps(tmp_path, exported):
    """``sparsify --weights magnitude:0.5 --quantize int8``: onnxruntime runs the result,
    whose pruned zeros stay exact zeros, and ``inspect`` reports its layers as int8."""
    from compiler.driver import inspect, random_inputs
    from compiler.onnx_io import load_model
    from sparsify.run import SparsifyOptions, sparsify

    source = exported("tiny-llama", seq_len=8)
    output = tmp_path / "q.onnx"
    sparsify(SparsifyOptions(str(source), str(output), weights="magnitude:0.5", quantize="int8"))
    report = inspect(str(output))
    assert report["layers"] and all(layer["dtype"] == "int8" for layer in report["layers"])
    # every layer but the output projection (to the vocabulary of 512), which stays dense
    assert min(layer["sparsity"] for layer in report["layers"] if layer["shape"][1] != 512) >= 0.45
    feeds = random_inputs(load_model(source))
    assert np.isfinite(onnxruntime_reference(output, feeds)[0]).all()
    with pytest.raises(SparseccError, match="decode"):
        from compiler.export import ExportOptions, export

        decode = tmp_path / "dec.onnx"
        export(ExportOptions("tiny-llama", str(decode), decode=True, max_context=16), progress=lambda *_: None)
        sparsify(SparsifyOptions(str(decode), str(tmp_path / "x.onnx"), quantize="int4"))
