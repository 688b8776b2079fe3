import numpy as np
import onnx.parser
from onnx import numpy_helper

from conftest import onnxruntime_reference
from passes.drop_dead_neurons import drop_dead_neurons

SWIGLU = """
<ir_version: 10, opset_import: ["" : 18]>
mlp (float[3, 16] x) => (float[3, 16] y) <float[16, 40] gate, float[16, 40] up, float[40, 16] down> {
    g = MatMul(x, gate)
    s = Sigmoid(g)
    a = Mul(g, s)
    u = MatMul(x, up)
    h = Mul(a, u)
    d = MatMul(h, down)
    y = Add(d, x)
}
"""


def _swiglu(rng, dead):
    weights = {"gate": rng.standard_normal((16, 40)), "up": rng.standard_normal((16, 40)), "down": rng.standard_normal((40, 16))}
    weights["down"][dead] = 0.0  # SEAP-style: whole neurons removed
    model = onnx.parser.parse_model(SWIGLU)
    del model.graph.initializer[:]
    model.graph.initializer.extend(numpy_helper.from_array(v.astype(np.float32), k) for k, v in weights.items())
    return model


def test_structure_dead_neurons_leave_every_weight():
    rng = np.random.default_rng(0)
    dead = rng.choice(40, 15, replace=False)
    result = drop_dead_neurons(_swiglu(rng, dead))
    assert result.modified
    shapes = {init.name: tuple(init.dims) for init in result.model.graph.initializer}
    assert shapes == {"gate": (16, 25), "up": (16, 25), "down": (25, 16)}
    assert "drops 15 of 40 neurons" in result.explanations[0]


def test_numerically_equal_to_the_original():
    rng = np.random.default_rng(1)
    model = _swiglu(rng, rng.choice(40, 20, replace=False))
    x = rng.standard_normal((3, 16)).astype(np.float32)
    before = onnxruntime_reference(model, {"x": x})[0]
    after = onnxruntime_reference(drop_dead_neurons(model).model, {"x": x})[0]
    # Only terms that were exactly zero are gone; float32 sums may round differently.
    np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-5)


def test_chain_through_a_non_elementwise_op_is_kept_with_a_reason():
    text = SWIGLU.replace("h = Mul(a, u)", "h0 = Mul(a, u)\n    h = Softmax(h0)")
    rng = np.random.default_rng(2)
    model = onnx.parser.parse_model(text)
    del model.graph.initializer[:]
    down = rng.standard_normal((40, 16)).astype(np.float32)
    down[:5] = 0
    for name, value in [("gate", rng.standard_normal((16, 40))), ("up", rng.standard_normal((16, 40))), ("down", down)]:
        model.graph.initializer.append(numpy_helper.from_array(value.astype(np.float32), name))
    result = drop_dead_neurons(model)
    assert not result.modified
    assert "Softmax) is not elementwise" in result.explanations[0]
