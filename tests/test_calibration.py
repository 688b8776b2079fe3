"""sparsify/calibration.py: the one sampler and threshold fitter that ``sparsecc compile``,
a decoder's build and ``sparsecc sparsify --activations teal`` share.

The three callers give the same threshold for the same tensor when they see the same model,
the same calibration data and the same level; the tests build exactly those cases.
"""

import numpy as np
import onnx.parser
import pytest
from onnx import numpy_helper

from compiler.build import CompileOptions, gating_for
from compiler.progress import SILENT
from sparsify.calibration import collect_stats, decoder_feeds, fit_thresholds

# x -> W1 -> Tanh -> h -> W2 -> b -> W3 -> y: the gated tensors are x and h; b stays
# ungated, as the input of the output projection (its result is the model's output).
CHAIN = """
<ir_version: 10, opset_import: ["" : 18]>
chain (float[4, 16] x) => (float[4, 8] y) <float[16, 16] w1, float[16, 12] w2, float[12, 8] w3> {
    a = MatMul(x, w1)
    h = Tanh(a)
    b = MatMul(h, w2)
    y = MatMul(b, w3)
}
"""


def chain_model(seed=0):
    """CHAIN with standard normal weights (the parser lists the weights, without values,
    as value_info)."""
    model = onnx.parser.parse_model(CHAIN)
    rng = np.random.default_rng(seed)
    for value in model.graph.value_info:
        shape = [d.dim_value for d in value.type.tensor_type.shape.dim]
        model.graph.initializer.append(numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), value.name))
    del model.graph.value_info[:]
    return model


def test_fitter_zeros_the_level_and_an_exact_gate_counts_zeros():
    magnitudes = np.abs(np.random.default_rng(0).standard_normal(10_000)).astype(np.float32)
    magnitudes[:500] = 0
    thresholds, measured = fit_thresholds({"x": magnitudes, "z": magnitudes}, {"x": 0.3, "z": 0.0})
    assert thresholds["x"] == pytest.approx(np.quantile(magnitudes, 0.3)) and measured["x"] == pytest.approx(0.3, abs=1e-3)
    assert thresholds["z"] == 0.0 and measured["z"] == pytest.approx(0.05)


def test_sampler_keeps_everything_when_the_bounds_exceed_the_data(tmp_path):
    """With bounds above the data's size the row and value samples are the whole tensor,
    in order, and the sums are exact (against numpy on the same onnxruntime outputs)."""
    from conftest import onnxruntime_reference

    model = chain_model()
    rng = np.random.default_rng(1)
    feeds = [{"x": rng.standard_normal((4, 16)).astype(np.float32)} for _ in range(3)]
    stats = collect_stats(model, ["h", "x"], feeds, rows=64, values=1000)
    xs = np.concatenate([feed["x"] for feed in feeds])
    np.testing.assert_array_equal(stats["x"].sample, xs)
    np.testing.assert_array_equal(np.sort(stats["x"].magnitudes), np.sort(np.abs(xs).ravel()))
    np.testing.assert_allclose(stats["x"].norms, np.sqrt((xs.astype(np.float64) ** 2).sum(axis=0)), rtol=1e-12)
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.append(onnx.helper.make_tensor_value_info("h", onnx.TensorProto.FLOAT, [4, 16]))
    hs = np.concatenate([onnxruntime_reference(probe, feed)[1] for feed in feeds])
    np.testing.assert_array_equal(stats["h"].sample, hs)
    assert stats["h"].count == 12


def test_compile_and_teal_fit_the_same_threshold_at_the_same_level(tmp_path):
    """TEAL gives each gated tensor its own level; at that level, on the same .npz, the
    compile path fits the same threshold. The data (8 batches of 4 rows) is smaller than
    both samplers' bounds (TEAL's 512 rows, compile's 2^18 values), so both fit on all of
    it. TEAL trims its last step by a float difference (a level within 1e-15 of the grid),
    hence the relative tolerance of 1e-6 on thresholds whose values are of order 1."""
    from sparsify.run import SparsifyOptions, sparsify

    model = chain_model()
    onnx.save(model, tmp_path / "chain.onnx")
    x = np.random.default_rng(2).standard_normal((8, 4, 16)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", x=x)
    summary = sparsify(SparsifyOptions(str(tmp_path / "chain.onnx"), str(tmp_path / "teal.onnx"), activations="teal:0.4",
                                       calib=str(tmp_path / "calib.npz")))
    gates = summary["activation_sparsity"]["gates"]
    assert sorted(gates) == ["h", "x"] and gates["x"]["level"] != gates["h"]["level"]
    for tensor, gate in gates.items():
        options = CompileOptions(str(tmp_path / "chain.onnx"), str(tmp_path / "c.sccx"), activation_sparsity=gate["level"],
                                 calib=str(tmp_path / "calib.npz"))
        thresholds, measured = gating_for(options, {"x": [4, 16]}, SILENT).calibrate(model)
        assert thresholds[tensor] == pytest.approx(gate["threshold"], rel=1e-6), tensor
        assert measured[tensor] == pytest.approx(gate["calibrated"], abs=1e-12), tensor


@pytest.mark.slow
def test_compile_and_decoder_fit_the_same_thresholds_on_the_prefill_graph(tmp_path):
    """A decoder calibrates on text windows of its prefill graph; ``sparsecc compile`` of
    that prefill graph with the same windows as an .npz fits the same thresholds, to the
    bit, and the decode graph gets them for the tensors that feed the same weights."""
    from compiler.decode_build import _gating, _weights_key
    from compiler.decode_export import decoding_metadata
    from compiler.export import ExportOptions, export
    from compiler.onnx_io import load_model
    from passes.insert_activation_gates import gated_inputs

    path = tmp_path / "step.onnx"
    export(ExportOptions("tiny-llama", str(path), decode=True, max_context=32), progress=lambda *_: None)
    decode = load_model(path)
    spec = decoding_metadata(decode)
    prefill_path = path.parent / spec["prefill_model"]
    prefill = load_model(prefill_path)
    options = CompileOptions(str(path), str(tmp_path / "d.sccx"), activation_sparsity=0.5, calib="pydoc", calib_tokens=96)
    prefill_gating, decode_gating = _gating(options, prefill, spec, SILENT)
    decoder_thresholds, decoder_measured = prefill_gating.calibrate(prefill)

    feeds = decoder_feeds(prefill, "pydoc", spec["prefill_len"], 96, spec["vocab_size"])
    assert len(feeds) == 96 // spec["prefill_len"]
    np.savez(tmp_path / "windows.npz", **{name: np.stack([feed[name] for feed in feeds]) for name in feeds[0]})
    compile_options = CompileOptions(str(prefill_path), str(tmp_path / "p.sccx"), activation_sparsity=0.5,
                                     calib=str(tmp_path / "windows.npz"))
    shapes = {value.name: [d.dim_value for d in value.type.tensor_type.shape.dim] for value in prefill.graph.input}
    compile_thresholds, compile_measured = gating_for(compile_options, shapes, SILENT).calibrate(prefill)
    assert compile_thresholds == decoder_thresholds and compile_measured == decoder_measured
    assert len(compile_thresholds) >= 6 and all(t > 0 for t in compile_thresholds.values())

    handed, _ = decode_gating().calibrate(decode)
    by_weights = {_weights_key(prefill, nodes): tensor for tensor, nodes in gated_inputs(prefill).items()}
    assert handed and all(handed[tensor] == decoder_thresholds[by_weights[_weights_key(decode, nodes)]]
                          for tensor, nodes in gated_inputs(decode).items() if tensor in handed)
