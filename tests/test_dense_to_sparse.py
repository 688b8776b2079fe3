import numpy as np
import onnx.parser
from onnx import numpy_helper

from conftest import onnxruntime_reference
from passes.dense_to_sparse import dense_to_sparse
from targets.cpu.legalize import COSTS as CPU_COSTS

THREE_LAYERS = """
<ir_version: 10, opset_import: ["" : 18]>
three (float[2, 64] x) => (float[2, 32] y) <float[64, 48] unstructured, float[48, 64] blocked, float[32, 64] dense, float[32] bias> {
    a = MatMul(x, unstructured)
    b = MatMul(a, blocked)
    y = Gemm<transB: int = 1>(b, dense, bias)
}
"""


def _model(rng):
    unstructured = rng.standard_normal((64, 48)).astype(np.float32)
    unstructured[rng.random((64, 48)) < 0.9] = 0
    blocked = np.repeat(rng.standard_normal((3, 64)).astype(np.float32), 16, axis=0)  # rows in 16-blocks
    blocked_t = blocked.T.copy()  # [N=64, K=48]: zero whole 16x1 blocks (16 outputs x 1 input)
    mask = np.repeat(rng.random((4, 48)) < 0.8, 16, axis=0)
    blocked_t[mask] = 0
    blocked = blocked_t.T.copy()
    dense = rng.standard_normal((32, 64)).astype(np.float32)
    bias = rng.standard_normal(32).astype(np.float32)
    model = onnx.parser.parse_model(THREE_LAYERS)
    del model.graph.initializer[:]
    for name, value in [("unstructured", unstructured), ("blocked", blocked), ("dense", dense), ("bias", bias)]:
        model.graph.initializer.append(numpy_helper.from_array(value, name))
    return model


def test_structure_sparse_layers_rewritten_dense_kept():
    result = dense_to_sparse(_model(np.random.default_rng(0)), CPU_COSTS)
    assert result.modified
    ops = [(node.op_type, node.overload) for node in result.model.graph.node]
    assert ops[0] == ("SparseMatMul", "csr")
    assert ops[1] == ("SparseMatMul", "bsr")
    assert ops[2] == ("Gemm", "")
    block = [a for a in result.model.graph.node[1].attribute if a.name == "block"][0]
    assert list(block.ints) == [16, 1]
    assert {f.overload for f in result.model.functions} == {"csr", "bsr"}
    assert any("dense [64x32] 0.0% zeros -> kept dense" in line for line in result.explanations)


def test_numerically_equal_to_the_dense_model():
    rng = np.random.default_rng(1)
    model = _model(rng)
    x = rng.standard_normal((2, 64)).astype(np.float32)
    before = onnxruntime_reference(model, {"x": x})[0]
    after = onnxruntime_reference(dense_to_sparse(model, CPU_COSTS).model, {"x": x})[0]
    # Same products summed in a different order: float32 rounding only.
    np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-5)


def test_pruned_tiny_model_matches_onnxruntime(exported, token_ids):
    from compiler.onnx_io import load_model
    from passes.fold_pruning_masks import fold_pruning_masks
    from passes.simplify_shapes import simplify_shapes

    path = exported("tiny-opt", prune=0.9)
    model = simplify_shapes(fold_pruning_masks(load_model(path)).model, {"input_ids": [1, 16]}).model
    result = dense_to_sparse(model, CPU_COSTS)
    assert sum(node.op_type == "SparseMatMul" for node in result.model.graph.node) == 12
    reference = onnxruntime_reference(path, {"input_ids": token_ids})[0]
    ours = onnxruntime_reference(result.model, {"input_ids": token_ids})[0]
    np.testing.assert_allclose(ours, reference, rtol=1e-4, atol=1e-5)


def test_cuda_costs_choose_only_formats_the_cuda_kernels_take():
    """At 70 % unstructured zeros the CPU's costs pick the bitmask; the cuda target has no
    bitmask kernel, so its costs pick csr for the same layer, and the explanation says
    whose costs decided."""
    from targets.cuda.legalize import COSTS as CUDA_COSTS

    rng = np.random.default_rng(3)
    model = _model(rng)
    weight = rng.standard_normal((64, 48)).astype(np.float32)
    weight[rng.random(weight.shape) < 0.7] = 0
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(weight, "unstructured"))
    # The pass rewrites the model it is given, so each target gets its own copy.
    cpu, cuda = dense_to_sparse(_copy(model), CPU_COSTS), dense_to_sparse(_copy(model), CUDA_COSTS)
    assert cpu.model.graph.node[0].overload == "bitmask"
    assert cuda.model.graph.node[0].overload == "csr"
    assert all(node.overload != "bitmask" for node in cuda.model.graph.node)
    assert any("unstructured [64x48]" in line and "cuda kernel costs" in line for line in cuda.explanations)
    x = rng.standard_normal((2, 64)).astype(np.float32)
    np.testing.assert_allclose(onnxruntime_reference(cuda.model, {"x": x})[0], onnxruntime_reference(cpu.model, {"x": x})[0],
                               rtol=1e-5, atol=1e-5)


def _copy(model):
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy
