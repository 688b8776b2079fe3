"""Neuromorphic legalisation: synaptic layers leave the graph for the chip's cores.

Math: every linear layer ``y = gate(x) @ W`` (``MatMul`` / ``Gemm`` with a constant 2-D
weight, ``SparseMatMul``, ``GatedMatMul``) becomes ``y = NeuroLinear[layer](x)`` in the
private domain ``ai.sparsecc.neuro``. Its weight (decoded to a dense [K, N] array with its
zeros) and gate go into a ``SynapticLayer``, which the mapper places on cores and the
simulator executes event by event: the nonzero entries of ``gate(x)`` are the events, and
a core does one synaptic operation per nonzero weight in the rows of the events it
receives. A Gemm's bias stays in the graph as an ``Add``.

Everything else (norms, softmax, attention over activations, the gates that are not fused
into a layer) is the controllers' program: it stays an ONNX graph, compiled by TVM for the
host, and each node is charged to the controllers of the layer that precedes it in graph
order at a per-element instruction cost (``controller_instructions``).

Precondition: the compile pipeline has run (input shapes fixed, shapes inferred).
Postcondition: no MatMul or Gemm with a constant weight is left in the graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from passes import sparse_ops
from passes.analyze_sparsity import linear_weight
from passes.base import Graph, gemm_refusal, node_label

DOMAIN = "ai.sparsecc.neuro"
NEURO_LINEAR = "NeuroLinear"

# Controller instructions per output element (per input element for reductions, per
# multiply-accumulate for MatMul between activations), for a single-issue controller
# without vector units: an estimate, written here so that a reader can change it.
ELEMENTWISE_INSTRUCTIONS = {
    "Add": 1, "Sub": 1, "Mul": 1, "Div": 4, "Neg": 1, "Abs": 1, "Relu": 1, "Max": 1, "Min": 1,
    "Where": 1, "Greater": 1, "Less": 1, "Equal": 1, "Cast": 1, "Clip": 2,
    "Sqrt": 8, "Reciprocal": 4, "Pow": 8, "Exp": 8, "Log": 8, "Sigmoid": 10, "Tanh": 10,
    "Erf": 10, "Sin": 10, "Cos": 10,
    "Transpose": 1, "Concat": 1, "Slice": 1, "Gather": 1, "Expand": 1, "Split": 1, "Tile": 1,
}
REDUCTION_INSTRUCTIONS = {"ReduceMean": 1, "ReduceSum": 1, "ReduceMax": 1, "Softmax": 10, "LayerNormalization": 8,
                          "SimplifiedLayerNormalization": 6}
# Shape bookkeeping that moves no data.
FREE_OPS = {"Reshape", "Squeeze", "Unsqueeze", "Shape", "Constant", "ConstantOfShape", "Identity", "Range", "Flatten"}
DEFAULT_INSTRUCTIONS = 1


@dataclass
class SynapticLayer:
    """One linear layer executed on the cores.

    Attributes:
        name: the ONNX node it came from.
        weight: the dense [K, N] float32 weight, zeros included.
        gate: ``threshold``, ``relu`` or ``none`` (events are then the nonzero inputs).
        threshold: the gate's float32 threshold, [1] or [K]; empty when there is none.
        input: the tensor the layer reads.
        output: the tensor it writes.
        source_layer: index of the layer whose cores produce that input (their
            controllers ran the ops in between), or -1 when it comes from the host.
        step: the chip timestep of the layer within a token: one more than the latest
            step of the layers its input depends on, so independent layers that read the
            same input (q, k and v) run in the same step.
    """

    name: str
    weight: np.ndarray
    gate: str
    threshold: np.ndarray
    input: str
    output: str
    source_layer: int = -1
    step: int = 0


def _layer_of(node: onnx.NodeProto, graph: Graph) -> tuple[np.ndarray, str, np.ndarray] | str:
    """(weight [K, N], gate mode, threshold) of a linear node, or why it stays in the graph."""
    if node.op_type == "Gemm":
        refusal = gemm_refusal(node)
        if refusal:
            return refusal
    found = linear_weight(node, graph)
    if found is None:
        return "its weight is not a constant matrix"
    weight = found[0]
    if weight.dtype != np.float32:
        return f"its weight is {weight.dtype}; the simulator takes float32"
    gate, threshold = "none", np.zeros(0, np.float32)
    if node.op_type == "GatedMatMul":
        gate = sparse_ops.weight_operands(node)[0]
        if gate == "threshold":
            threshold = graph.constant(node.input[1])
            if threshold is None:
                return "its gate threshold is not a constant"
            threshold = np.asarray(threshold, np.float32).reshape(-1)
    return np.ascontiguousarray(weight), gate, threshold


def _is_linear(node: onnx.NodeProto) -> bool:
    if node.domain == sparse_ops.DOMAIN:
        return node.op_type in ("SparseMatMul", "GatedMatMul")
    return node.op_type in ("MatMul", "Gemm") and node.domain in ("", "ai.onnx")


def controller_instructions(node: onnx.NodeProto, shapes: dict[str, list[int]]) -> int:
    """Instructions a controller spends on ``node`` (0 when a shape is unknown or the op
    moves no data)."""
    if node.op_type in FREE_OPS:
        return 0

    def elements(name: str) -> int | None:
        dims = shapes.get(name)
        return int(np.prod(dims)) if dims is not None else None

    if node.op_type == "MatMul":  # between two activations: attention scores and values
        a, b = shapes.get(node.input[0]), shapes.get(node.input[1])
        out = elements(node.output[0])
        if a is None or b is None or out is None or not a:
            return 0
        return out * int(a[-1])
    if node.op_type in REDUCTION_INSTRUCTIONS:
        count = elements(node.input[0])
        return (count or 0) * REDUCTION_INSTRUCTIONS[node.op_type]
    per = ELEMENTWISE_INSTRUCTIONS.get(node.op_type, DEFAULT_INSTRUCTIONS)
    return sum((elements(out) or 0) * per for out in node.output if out)


def known_shapes(model: onnx.ModelProto) -> dict[str, list[int]]:
    """Static shapes of every tensor ONNX shape inference can determine."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # inference is best effort: unknown shapes cost nothing
        inferred = model
    shapes = {}
    for info in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]:
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in info.type.tensor_type.shape.dim]
        if all(d >= 0 for d in dims):
            shapes[info.name] = dims
    for init in model.graph.initializer:
        shapes[init.name] = list(init.dims)
    return shapes


def _live_nodes(nodes: list[onnx.NodeProto], outputs: set[str]) -> list[onnx.NodeProto]:
    """The nodes that the graph outputs depend on, in their order."""
    needed, live = set(outputs), []
    for node in reversed(nodes):
        if any(out in needed for out in node.output):
            live.append(node)
            needed.update(node.input)
    return live[::-1]


def extract_layers(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[SynapticLayer], list[int], list[str]]:
    """Replaces the linear layers with ``NeuroLinear`` nodes.

    Returns:
        The rewritten model; the layers in graph order; the controller instructions of
        each layer's phase (the ops between it and the next layer, for all rows of the
        compiled input); and one explanation per layer.
    """
    shapes = known_shapes(model)
    graph = Graph(model.graph)
    layers: list[SynapticLayer] = []
    instructions: list[int] = []
    explanations: list[str] = []
    owner: dict[str, int] = {}  # tensor -> layer whose phase computed it
    depth: dict[str, int] = {}  # tensor -> latest step of the synaptic layers it depends on
    phase_of: dict[int, int] = {}  # id of a controller node -> layer whose phase runs it
    new_nodes: list[onnx.NodeProto] = []
    for node in model.graph.node:
        found = _layer_of(node, graph) if _is_linear(node) else None
        if isinstance(found, tuple):
            weight, gate, threshold = found
            index = len(layers)
            layers.append(SynapticLayer(node_label(node), weight, gate, threshold, node.input[0], node.output[0],
                                        owner.get(node.input[0], -1), depth.get(node.input[0], 0) + 1))
            instructions.append(0)
            has_bias = node.op_type == "Gemm" and len(node.input) > 2 and node.input[2]
            output = node.output[0] + "_synaptic" if has_bias else node.output[0]
            new_nodes.append(helper.make_node(NEURO_LINEAR, [node.input[0]], [output], name=node_label(node),
                                              domain=DOMAIN, layer=index, n=int(weight.shape[1])))
            if has_bias:
                new_nodes.append(helper.make_node("Add", [output, node.input[2]], [node.output[0]], name=node_label(node) + "_bias"))
            owner[node.output[0]] = index
            depth[output] = depth[node.output[0]] = depth.get(node.input[0], 0) + 1
            k, n = weight.shape
            explanations.append(f"neuro: {node_label(node)} [{k}x{n}] -> synaptic layer {index} "
                                f"({np.count_nonzero(weight) / weight.size:.1%} nonzero weights, gate {gate}).")
            continue
        if isinstance(found, str):
            explanations.append(f"neuro: {node_label(node)} runs on the controllers: {found}.")
        current = len(layers) - 1
        phase_of[id(node)] = max(current, 0)  # work before the first layer joins its phase
        reached = max((depth.get(name, 0) for name in node.input), default=0)
        for out in node.output:
            owner[out] = current
            depth[out] = reached
        new_nodes.append(node)
    # Nodes whose outputs are no longer used (the Transpose that fed a tied head its
    # weight) leave the program; nodes of constants only are folded when it is compiled.
    # Neither costs the controllers anything.
    live = _live_nodes(new_nodes, {out.name for out in model.graph.output})
    constant = {init.name for init in model.graph.initializer} | set(graph.constant_nodes)
    for node in live:
        if node.domain != DOMAIN and id(node) in phase_of:
            if all(name in constant or not name for name in node.input):
                constant.update(node.output)
            elif layers:
                instructions[phase_of[id(node)]] += controller_instructions(node, shapes)
    del model.graph.node[:]
    model.graph.node.extend(live)
    if not any(opset.domain == DOMAIN for opset in model.opset_import):
        model.opset_import.append(helper.make_opsetid(DOMAIN, 1))
    if not layers:
        explanations.append("neuro: the model has no linear layer with a constant weight; everything runs on the controllers.")
    return model, layers, instructions, explanations
