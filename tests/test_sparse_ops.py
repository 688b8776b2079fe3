"""The ai.sparsecc ops run in onnxruntime through their reference functions."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import onnxruntime_reference
from passes import sparse_ops
from passes.sparse_formats import encode

CASES = [("dense", None), ("csr", None), ("bitmask", None), ("bsr", (4, 1)), ("bsr", (1, 8)), ("bsr", (4, 4))]


def _weight(rng, k, n, sparsity):
    weight = rng.standard_normal((k, n)).astype(np.float32)
    weight[rng.random((k, n)) < sparsity] = 0
    return weight


def _model(node, inputs, initializers, k, n, m=3):
    graph = helper.make_graph(
        [node], "g",
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, shape) for name, shape in inputs],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, n])],
        [numpy_helper.from_array(array, name) for name, array in initializers],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    onnx.checker.check_model(sparse_ops.attach_reference_functions(model))
    return model


@pytest.mark.parametrize("format, block", CASES)
@pytest.mark.parametrize("k, n, sparsity", [(13, 7, 0.6), (16, 8, 0.0), (9, 5, 1.0)])
def test_sparse_matmul_reference_equals_dense_product(format, block, k, n, sparsity):
    rng = np.random.default_rng(k * n)
    weight = _weight(rng, k, n, sparsity)
    arrays = encode(weight, format, block)
    names = [f"w{i}" for i in range(len(arrays))]
    node = sparse_ops.sparse_matmul_node("x", names, "y", format, (k, n), block)
    model = _model(node, [("x", [3, k])], list(zip(names, arrays)), k, n)
    x = rng.standard_normal((3, k)).astype(np.float32)
    (y,) = onnxruntime_reference(model, {"x": x})
    np.testing.assert_allclose(y, x @ weight, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("format, block", CASES)
def test_gated_matmul_reference(format, block):
    rng = np.random.default_rng(7)
    k, n = 12, 6
    weight = _weight(rng, k, n, 0.5)
    arrays = encode(weight, format, block)
    names = [f"w{i}" for i in range(len(arrays))]
    threshold = np.array([0.7], np.float32)
    node = sparse_ops.gated_matmul_node("x", "t", names, "y", "threshold", format, (k, n), block)
    model = _model(node, [("x", [3, k])], [("t", threshold), *zip(names, arrays)], k, n)
    x = rng.standard_normal((3, k)).astype(np.float32)
    (y,) = onnxruntime_reference(model, {"x": x})
    gated = np.where(np.abs(x) > threshold, x, 0)
    np.testing.assert_allclose(y, gated @ weight, rtol=1e-5, atol=1e-6)


def test_activation_gate_makes_exact_zeros():
    rng = np.random.default_rng(8)
    x = rng.standard_normal((3, 10)).astype(np.float32)
    threshold = np.linspace(0, 1, 10).astype(np.float32)  # per channel
    node = sparse_ops.activation_gate_node("x", "t", "y", "threshold")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 10])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 10])],
                              [numpy_helper.from_array(threshold, "t")])
    model = sparse_ops.attach_reference_functions(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10))
    (y,) = onnxruntime_reference(model, {"x": x})
    np.testing.assert_array_equal(y, np.where(np.abs(x) > threshold, x, 0))
    assert [f.overload for f in model.functions] == ["threshold"]
