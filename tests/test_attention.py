"""The fused decode attention: the CPU kernel against numpy, and the graph matcher.

Tolerance: ``1e-5`` absolute against a float64 softmax. The kernel's online softmax
rescales partial sums once per 128-slot chunk and sums in fp32 in another order, which
moves outputs of order 1 by a few 1e-7; a slot read that should be skipped (or skipped
that should be read) moves them by O(0.1).
"""

from __future__ import annotations

import os

os.environ.setdefault("TVM_NUM_THREADS", str(os.cpu_count() or 1))

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from targets.attention import DECODE_ATTENTION, fuse_decode_attention
from targets.cpu.attention import decode_attention_func

ATOL = 1e-5


def _reference(q, key, value, mask, new_score, new_value, scale):
    scores = np.einsum("hgd,hds->hgs", q.astype(np.float64), key) * scale
    scores = np.concatenate([np.where(mask, scores, -np.inf), new_score[..., None]], axis=-1)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    slots = key.shape[-1]
    return np.einsum("hgs,hsd->hgd", weights[..., :slots], value) + weights[..., slots:] * new_value[:, None, :]


@pytest.mark.parametrize("heads,group,dim,slots", [(3, 3, 64, 256), (2, 1, 6, 37), (1, 4, 16, 300)])
@pytest.mark.parametrize("filled", ["none", "one", "prefix", "scattered", "all"])
def test_kernel_matches_numpy(heads, group, dim, slots, filled):
    import tvm

    from targets.cpu.host import host_target

    rng = np.random.default_rng(slots)
    scale = 1 / np.sqrt(dim)
    arrays = [rng.standard_normal(shape).astype(np.float32)
              for shape in ((heads, group, dim), (heads, dim, slots), (heads, slots, dim))]
    mask = {"none": np.zeros(slots, bool), "one": np.arange(slots) == slots - 1,
            "prefix": np.arange(slots) < slots * 2 // 3 + 1, "scattered": rng.random(slots) < 0.3,
            "all": np.ones(slots, bool)}[filled]
    new_score = rng.standard_normal((heads, group)).astype(np.float32)
    new_value = rng.standard_normal((heads, dim)).astype(np.float32)
    func = decode_attention_func(heads, group, dim, slots, float(scale))
    symbol = str(func.attrs["global_symbol"])
    kernel = tvm.compile(tvm.IRModule({symbol: func}), target=host_target()).mod[symbol]
    y = tvm.runtime.tensor(np.full((heads, group, dim), np.nan, np.float32))
    kernel(*[tvm.runtime.tensor(a) for a in (*arrays, mask, new_score, new_value)], y)
    expected = _reference(*arrays, mask, new_score, new_value, scale)
    np.testing.assert_allclose(y.numpy(), expected, atol=ATOL, rtol=0)


def test_kernel_refuses_empty_sizes():
    with pytest.raises(ValueError, match="slots"):
        decode_attention_func(1, 1, 8, 0, 0.5)


def _decode_graph(decoder) -> onnx.ModelProto:
    """tiny-llama's decode step with shapes fixed and constants folded, as legalisation sees it."""
    from passes.simplify_shapes import simplify_shapes

    onnx_path, _ = decoder
    model = onnx.load(str(onnx_path))
    shapes = {value.name: [d.dim_value for d in value.type.tensor_type.shape.dim] for value in model.graph.input}
    return simplify_shapes(model, shapes).model


def test_every_layer_of_a_decode_step_is_fused(decoder):
    model = _decode_graph(decoder)
    softmaxes = sum(node.op_type == "Softmax" for node in model.graph.node)
    explanations = fuse_decode_attention(model, "ai.sparsecc.cpu")
    fused = [node for node in model.graph.node if node.op_type == DECODE_ATTENTION]
    assert softmaxes == 2 and len(fused) == 2 and len(explanations) == 2
    assert not any(node.op_type == "Softmax" for node in model.graph.node)
    assert fused[0].input[1] == "past_key_0" and fused[0].input[2] == "past_value_0"


def test_a_finite_fill_value_is_not_fused(decoder):
    """Masked slots filled with a value whose exponential is not 0 still weigh in the
    softmax, so skipping them would change the result: such a graph is left alone."""
    model = _decode_graph(decoder)
    where = next(node for node in model.graph.node if node.op_type == "Where" and node.input[0] == "lt")
    fill = next(init for init in model.graph.initializer if init.name == where.input[2])
    fill.CopyFrom(numpy_helper.from_array(np.array(-5.0, np.float32), fill.name))
    assert fuse_decode_attention(model, "ai.sparsecc.cpu") == []  # both layers read this fill
    assert sum(node.op_type == "Softmax" for node in model.graph.node) == 2
