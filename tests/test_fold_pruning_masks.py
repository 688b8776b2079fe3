import numpy as np
import onnx
import onnx.parser
import pytest
from onnx import numpy_helper

from conftest import onnxruntime_reference
from passes.fold_pruning_masks import fold_pruning_masks

MASKED_LINEAR = """
<ir_version: 8, opset_import: ["" : 18]>
masked (float[2, 4] x) => (float[2, 3] y) <float[4, 3] weight_orig, float[4, 3] weight_mask> {
    weight = Mul(weight_orig, weight_mask)
    y = MatMul(x, weight)
}
"""


def _with_initializers(text: str, **arrays) -> onnx.ModelProto:
    model = onnx.parser.parse_model(text)
    del model.graph.initializer[:]
    for name, value in arrays.items():
        model.graph.initializer.append(numpy_helper.from_array(value, name))
    return model


def _masked_linear(rng, mask=None):
    weight = rng.standard_normal((4, 3)).astype(np.float32)
    if mask is None:
        mask = (rng.random((4, 3)) > 0.5).astype(np.float32)
    return _with_initializers(MASKED_LINEAR, weight_orig=weight, weight_mask=mask), weight, mask


def test_structure_mask_product_becomes_one_weight():
    rng = np.random.default_rng(0)
    model, weight, mask = _masked_linear(rng)
    result = fold_pruning_masks(model)
    assert result.modified
    graph = result.model.graph
    assert [node.op_type for node in graph.node] == ["MatMul"]
    assert [init.name for init in graph.initializer] == ["weight"]
    folded = numpy_helper.to_array(graph.initializer[0])
    np.testing.assert_array_equal(folded, weight * mask)
    assert graph.node[0].input[1] == "weight"


def test_numerically_exact_against_onnxruntime():
    rng = np.random.default_rng(1)
    model, _, _ = _masked_linear(rng)
    x = rng.standard_normal((2, 4)).astype(np.float32)
    before = onnxruntime_reference(model, {"x": x})[0]
    after = onnxruntime_reference(fold_pruning_masks(model).model, {"x": x})[0]
    # Folding multiplies by exact 0 and 1, so the results are bit-identical.
    np.testing.assert_array_equal(before, after)


def test_mask_on_the_left_is_recognised():
    text = MASKED_LINEAR.replace("Mul(weight_orig, weight_mask)", "Mul(weight_mask, weight_orig)")
    rng = np.random.default_rng(2)
    weight = rng.standard_normal((4, 3)).astype(np.float32)
    mask = np.eye(4, 3, dtype=np.float32)
    result = fold_pruning_masks(_with_initializers(text, weight_orig=weight, weight_mask=mask))
    np.testing.assert_array_equal(numpy_helper.to_array(result.model.graph.initializer[0]), weight * mask)


def test_non_binary_operand_is_kept_with_a_reason():
    rng = np.random.default_rng(3)
    model, _, _ = _masked_linear(rng, mask=np.full((4, 3), 0.5, dtype=np.float32))
    result = fold_pruning_masks(model)
    assert not result.modified
    assert any("neither operand is a 0/1 mask" in line for line in result.explanations)


def test_mask_on_a_graph_input_is_kept_with_a_reason():
    text = """
    <ir_version: 8, opset_import: ["" : 18]>
    masked (float[2, 4] x, float[4, 3] weight_mask) => (float[2, 3] y) <float[4, 3] weight_orig> {
        weight = Mul(weight_orig, weight_mask)
        y = MatMul(x, weight)
    }
    """
    weight = np.ones((4, 3), dtype=np.float32)
    result = fold_pruning_masks(_with_initializers(text, weight_orig=weight))
    assert not result.modified
    assert any("weight_mask is a graph input, not an initializer" in line for line in result.explanations)


def test_torch_pruned_export_has_masks_and_folds(exported):
    from compiler.onnx_io import load_model

    model = load_model(exported("tiny-llama", prune=0.5))
    masks = [init.name for init in model.graph.initializer if init.name.endswith("weight_mask")]
    assert masks, "the exported pruned model should carry torch's weight_mask tensors"
    ids = np.random.default_rng(0).integers(0, 512, size=(1, 16)).astype(np.int64)
    before = onnxruntime_reference(model, {"input_ids": ids})[0]
    result = fold_pruning_masks(model)
    assert result.modified
    assert not [i for i in result.model.graph.initializer if i.name.endswith("weight_mask")]
    after = onnxruntime_reference(result.model, {"input_ids": ids})[0]
    np.testing.assert_array_equal(before, after)
