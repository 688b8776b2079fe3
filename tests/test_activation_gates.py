"""insert_activation_gates (calibrated thresholds) and fuse_gated_matmul."""

import numpy as np
import onnx.parser
import pytest
from onnx import numpy_helper

from conftest import onnxruntime_reference
from passes.dense_to_sparse import dense_to_sparse
from passes.fuse_gated_matmul import fuse_gated_matmul
from passes.insert_activation_gates import gated_inputs, insert_activation_gates
from sparsify.calibration import calibrate_thresholds
from targets.cpu.legalize import COSTS as CPU_COSTS

MLP = """
<ir_version: 10, opset_import: ["" : 18]>
mlp (float[4, 32] x) => (float[4, 8] y) <float[32, 24] up, float[32, 24] gate, float[24, 8] down, float[8] bias> {
    u = MatMul(x, up)
    g = MatMul(x, gate)
    h = Mul(u, g)
    r = Relu(h)
    d = MatMul(r, down)
    y = Add(d, bias)
}
"""


def _mlp(rng, sparsity=0.0, text=MLP):
    model = onnx.parser.parse_model(text)
    del model.graph.initializer[:]
    shapes = [("up", (32, 24)), ("gate", (32, 24)), ("down", (24, 8)), ("bias", (8,))]
    for name, shape in shapes[: 4 if "bias" in text else 3]:
        value = rng.standard_normal(shape).astype(np.float32)
        value[rng.random(shape) < sparsity] = 0
        model.graph.initializer.append(numpy_helper.from_array(value, name))
    return model


def test_gates_go_on_each_distinct_linear_input():
    rng = np.random.default_rng(0)
    model = _mlp(rng)
    assert sorted(gated_inputs(model)) == ["r", "x"]
    result = insert_activation_gates(model, {"x": 0.5})
    gates = [(n.input[0], n.overload) for n in result.model.graph.node if n.op_type == "ActivationGate"]
    assert sorted(gates) == [("r", "relu"), ("x", "threshold")]
    assert [n.input[0] for n in result.model.graph.node if n.op_type == "MatMul"] == ["x_gated", "x_gated", "r_gated"]


def test_output_projection_is_not_gated():
    text = MLP.replace("d = MatMul(r, down)\n    y = Add(d, bias)", "y = MatMul(r, down)").replace(", float[8] bias", "")
    assert sorted(gated_inputs(_mlp(np.random.default_rng(0), text=text))) == ["x"]


def test_calibrated_threshold_reaches_the_target_sparsity():
    rng = np.random.default_rng(1)
    model = _mlp(rng)
    feeds = [{"x": rng.standard_normal((4, 32)).astype(np.float32)} for _ in range(20)]
    thresholds, measured = calibrate_thresholds(model, ["x"], feeds, 0.6)
    # For a standard normal, the 60 % quantile of |x| is about 0.84.
    assert thresholds["x"] == pytest.approx(0.84, abs=0.08)
    assert measured["x"] == pytest.approx(0.6, abs=0.01)
    up, gate, down, bias = (numpy_helper.to_array(i) for i in model.graph.initializer)
    gated = insert_activation_gates(model, thresholds).model
    x = feeds[0]["x"]
    y = onnxruntime_reference(gated, {"x": x})[0]
    xg = np.where(np.abs(x) > thresholds["x"], x, 0)
    np.testing.assert_allclose(y, np.maximum((xg @ up) * (xg @ gate), 0) @ down + bias, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("weight_sparsity", [0.0, 0.9])
def test_fusion_shares_one_gate_and_keeps_the_function(weight_sparsity):
    rng = np.random.default_rng(2)
    gated = insert_activation_gates(_mlp(rng, weight_sparsity), {"x": 0.5}).model
    x = rng.standard_normal((4, 32)).astype(np.float32)
    before = onnxruntime_reference(gated, {"x": x})[0]
    result = fuse_gated_matmul(dense_to_sparse(gated, CPU_COSTS).model, CPU_COSTS)
    assert result.modified
    ops = [(n.op_type, n.overload) for n in result.model.graph.node]
    expected_format = "dense" if weight_sparsity == 0 else "csr"
    assert ops.count(("GatedMatMul", f"threshold_{expected_format}")) == 1  # up and gate fused into one
    assert ("Split", "") in ops
    assert not any(op == "ActivationGate" for op, _ in ops)
    after = onnxruntime_reference(result.model, {"x": x})[0]
    np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-5)
