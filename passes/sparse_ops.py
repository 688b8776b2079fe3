"""The sparse operator set, domain ``ai.sparsecc`` version 1, with reference semantics.

Every op is defined as an ONNX model-local function (one per overload), written in
standard ONNX ops, so onnxruntime runs any rewritten model and it can be checked against
the dense original. Compilers (our CPU target) replace the nodes with kernels and never
run these bodies.

| op | inputs | attributes | overloads |
|---|---|---|---|
| ``SparseMatMul`` | X, weight arrays of the format | ``shape`` [K, N], ``block`` [R, C] (bsr) | ``dense``, ``csr``, ``bsr``, ``bitmask`` |
| ``ActivationGate`` | X, threshold (scalar or [K]) | ``mode`` | ``threshold``, ``relu`` |
| ``GatedMatMul`` | X, threshold, weight arrays | ``shape``, ``block`` | ``threshold_<format>`` |

Weight arrays and reference bodies are each format's own (``formats/``: the formats with a
``reference`` body). The gate is ``Y = X * (|X| > t)`` with exact zeros; ``relu`` mode is
``max(X, 0)``, for inputs a ReLU already made sparse. ``GatedMatMul`` is
``SparseMatMul(ActivationGate(X), W)``.
"""

from __future__ import annotations

import onnx
import onnx.parser
from onnx import helper

import formats

DOMAIN = "ai.sparsecc"
VERSION = 1
# Overloaded functions need IR version 10.
MIN_IR_VERSION = 10
_OPSET = 18

_HEADER = f'<domain: "{DOMAIN}", opset_import: ["" : {_OPSET}]>'

_GATE_BODIES = {
    "threshold": """
    magnitude = Abs (x)
    active = Greater (magnitude, threshold)
    zero_value = Constant <value: tensor = float {0}> ()
    gated = Where (active, x, zero_value)
""",
    "relu": "    gated = Relu (x)\n",
}

FORMATS = formats.onnx_formats()
GATE_MODES = tuple(_GATE_BODIES)


def _function(op: str, overload: str, inputs: list[str], attributes: list[str], body: str) -> onnx.FunctionProto:
    attrs = f"<{', '.join(attributes)}>" if attributes else ""
    text = f"{_HEADER}\n{op} {attrs}({', '.join(inputs)}) => (y) {{\n{body}\n}}"
    function = onnx.parser.parse_function(text)
    function.overload = overload
    return function


def _weight_signature(format: str) -> tuple[list[str], list[str], str]:
    """(weight input names, attribute names, reference body) of an ``ai.sparsecc`` format."""
    described = formats.get(format)
    if described.reference is None:
        raise ValueError(f"{format} is a target's private layout, not an {DOMAIN} format; choose one of {', '.join(FORMATS)}")
    return list(described.arrays), ["shape", "block"] if described.takes_block else ["shape"], described.reference


def sparse_matmul_function(format: str) -> onnx.FunctionProto:
    names, attributes, body = _weight_signature(format)
    return _function("SparseMatMul", format, ["x", *names], attributes, body.replace("$X", "x"))


def activation_gate_function(mode: str) -> onnx.FunctionProto:
    inputs = ["x", "threshold"] if mode == "threshold" else ["x"]
    return _function("ActivationGate", mode, inputs, [], _GATE_BODIES[mode] + "    y = Identity (gated)\n")


def gated_matmul_function(mode: str, format: str) -> onnx.FunctionProto:
    names, attributes, body = _weight_signature(format)
    inputs = ["x", "threshold", *names] if mode == "threshold" else ["x", *names]
    return _function("GatedMatMul", f"{mode}_{format}", inputs, attributes,
                     _GATE_BODIES[mode] + body.replace("$X", "gated"))


def sparse_matmul_node(x: str, weights: list[str], output: str, format: str, shape: tuple[int, int],
                       block: tuple[int, int] | None = None, name: str = "") -> onnx.NodeProto:
    """A ``SparseMatMul`` node; ``weights`` are the names of the format's arrays."""
    attributes = {"shape": list(shape)}
    if formats.get(format).takes_block:
        attributes["block"] = list(block)
    node = helper.make_node("SparseMatMul", [x, *weights], [output], name=name, domain=DOMAIN, **attributes)
    node.overload = format
    return node


def activation_gate_node(x: str, threshold: str | None, output: str, mode: str, name: str = "") -> onnx.NodeProto:
    inputs = [x, threshold] if mode == "threshold" else [x]
    node = helper.make_node("ActivationGate", inputs, [output], name=name, domain=DOMAIN)
    node.overload = mode
    return node


def gated_matmul_node(x: str, threshold: str | None, weights: list[str], output: str, mode: str, format: str,
                      shape: tuple[int, int], block: tuple[int, int] | None = None, name: str = "") -> onnx.NodeProto:
    attributes = {"shape": list(shape)}
    if formats.get(format).takes_block:
        attributes["block"] = list(block)
    inputs = [x, threshold, *weights] if mode == "threshold" else [x, *weights]
    node = helper.make_node("GatedMatMul", inputs, [output], name=name, domain=DOMAIN, **attributes)
    node.overload = f"{mode}_{format}"
    return node


def weight_operands(node: onnx.NodeProto) -> tuple[str, str, list[str]]:
    """(gate mode or "", format, weight array names) of a SparseMatMul or GatedMatMul."""
    if node.op_type == "GatedMatMul":
        mode, _, format = node.overload.partition("_")
        return mode, format, list(node.input[2:] if mode == "threshold" else node.input[1:])
    return "", node.overload, list(node.input[1:])


def _function_for(node: onnx.NodeProto) -> onnx.FunctionProto:
    if node.op_type == "SparseMatMul":
        return sparse_matmul_function(node.overload)
    if node.op_type == "ActivationGate":
        return activation_gate_function(node.overload)
    if node.op_type == "GatedMatMul":
        mode, _, format = node.overload.partition("_")
        return gated_matmul_function(mode, format)
    raise ValueError(f"{node.op_type} is not an {DOMAIN} op")


def attach_reference_functions(model: onnx.ModelProto) -> onnx.ModelProto:
    """Adds the function of every ``ai.sparsecc`` op overload the graph uses (once each),
    the domain's opset import and the IR version overloads need; drops unused ones."""
    needed = {}
    for node in model.graph.node:
        if node.domain == DOMAIN:
            needed.setdefault((node.op_type, node.overload), _function_for(node))
    keep = [f for f in model.functions if f.domain != DOMAIN]
    del model.functions[:]
    model.functions.extend(keep + list(needed.values()))
    if needed and not any(opset.domain == DOMAIN for opset in model.opset_import):
        model.opset_import.append(helper.make_opsetid(DOMAIN, VERSION))
    if needed:
        model.ir_version = max(model.ir_version, MIN_IR_VERSION)
    return model
