"""Remove hidden neurons whose outgoing weights are all zero.

Math, for a linear layer ``y = h @ W_D`` whose input ``h`` is an elementwise function of
other linear layers' outputs (an MLP: ``h = act(x @ W_G) * (x @ W_U)``)::

    W_D[k, :] == 0   ->   neuron k contributes nothing to y, so
    y = h[:, keep] @ W_D[keep, :],   h[:, keep] = act(x @ W_G[:, keep]) * (x @ W_U[:, keep])

Structured pruning (whole neurons, as SEAP does) leaves exactly such rows; dropping them
makes the dense matmuls physically smaller instead of multiplying by zeros.

Precondition: weights are initializers (after ``simplify_shapes``); runs before gates and
sparse ops. The chain from the producers to ``h`` may hold only elementwise ops, each of
whose outputs is used only inside the chain; constants in it are scalars or broadcast
along the neuron axis. Postcondition: the same function (only exact-zero terms of the
sums are removed); the shrunk tensors lose their stale shape annotations.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from passes.base import Graph, PassResult, node_label, remove_unused_initializers

ELEMENTWISE = {"Mul", "Add", "Sub", "Div", "Relu", "Sigmoid", "Tanh", "Gelu", "Erf", "Neg", "Identity", "Softplus", "Elu", "LeakyRelu"}


def _weight_input(node: onnx.NodeProto) -> tuple[str, bool] | None:
    """(weight initializer name, stored transposed) of a MatMul or Gemm."""
    if node.op_type == "MatMul":
        return node.input[1], False
    if node.op_type == "Gemm":
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if attrs.get("transA", 0):
            return None
        return node.input[1], bool(attrs.get("transB", 0))
    return None


def _owned_initializer(name: str, graph: Graph) -> np.ndarray | None:
    """The value of an initializer only one node reads (so slicing it changes nothing else)."""
    if name not in graph.initializers or name in graph.graph_inputs or len(graph.consumers.get(name, [])) != 1:
        return None
    return graph.constant(name)


def _trace_chain(tensor: str, width: int, graph: Graph, chain: list, leaves: list, constants: list) -> str | None:
    """Walks back from ``tensor``; fills the chain's nodes, leaf linear nodes and constants
    broadcast along the neuron axis. Returns why the walk failed, or None."""
    if tensor in graph.graph_outputs:
        return f"{tensor} is a model output"
    node = graph.producers.get(tensor)
    if node is None:
        return f"{tensor} is not computed from linear layers"
    if any(node is seen for seen in chain + leaves):
        return None  # reached again through another operand (g in g * sigmoid(g))
    if node.op_type in ("MatMul", "Gemm"):
        found = _weight_input(node)
        weight = _owned_initializer(found[0], graph) if found else None
        if weight is None or weight.ndim != 2:
            return f"{node_label(node)} has no weight initializer of its own"
        if (weight.shape[0] if found[1] else weight.shape[1]) != width:
            return f"{node_label(node)} has {weight.shape} outputs, not {width}"
        if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2] and _owned_initializer(node.input[2], graph) is None:
            return f"{node_label(node)} has a bias that is not an initializer of its own"
        leaves.append(node)
        return None
    if node.op_type not in ELEMENTWISE or node.domain not in ("", "ai.onnx"):
        return f"{node_label(node)} ({node.op_type}) is not elementwise"
    chain.append(node)
    for name in node.input:
        if graph.is_constant(name):
            value = graph.constant(name)
            if value.size == 1:
                continue
            if value.shape[-1] != width or _owned_initializer(name, graph) is None:
                return f"constant {name} of shape {value.shape} is not a per-neuron initializer of its own"
            if name not in constants:
                constants.append(name)
            continue
        reason = _trace_chain(name, width, graph, chain, leaves, constants)
        if reason:
            return reason
    return None


def drop_dead_neurons(model: onnx.ModelProto) -> PassResult:
    """Drops every neuron whose row of the consuming weight is zero."""
    graph = Graph(model.graph)
    explanations: list[str] = []
    replacements: dict[str, np.ndarray] = {}
    stale: set[str] = set()
    for node in model.graph.node:
        found = _weight_input(node)
        weight = _owned_initializer(found[0], graph) if found else None
        if weight is None or weight.ndim != 2 or found[0] in replacements:
            continue
        rows = weight.T if found[1] else weight  # [K, N]
        dead = ~rows.any(axis=1)
        if not dead.any():
            continue
        chain, leaves, constants = [], [], []
        reason = _trace_chain(node.input[0], rows.shape[0], graph, chain, leaves, constants)
        label = node_label(node)
        if reason is None and not leaves:
            reason = "its input is not computed from linear layers"
        if reason is None:
            inside = {id(n) for n in chain + [node]}
            escaping = [out for n in chain + leaves for out in n.output
                        if any(id(c) not in inside for c in graph.consumers.get(out, []))]
            if escaping:
                reason = f"{escaping[0]} is also used outside the MLP"
        if reason is None and dead.all():
            reason = "every neuron is dead (the layer computes zeros); left for the user to remove"
        if reason:
            explanations.append(f"drop_dead_neurons: {label} has {int(dead.sum())} zero rows, kept: {reason}.")
            continue
        keep = ~dead
        replacements[found[0]] = (rows[keep].T if found[1] else rows[keep])
        for leaf in leaves:
            name, transposed = _weight_input(leaf)
            leaf_weight = replacements.get(name, graph.constant(name))
            replacements[name] = leaf_weight[keep] if transposed else leaf_weight[:, keep]
            if leaf.op_type == "Gemm" and len(leaf.input) > 2 and leaf.input[2]:
                bias = _owned_initializer(leaf.input[2], graph)
                if bias.size != 1:
                    replacements[leaf.input[2]] = bias[..., keep]
            stale.add(leaf.output[0])
        for name in constants:
            replacements[name] = graph.constant(name)[..., keep]
        stale.update(out for n in chain for out in n.output)
        explanations.append(f"drop_dead_neurons: {label} drops {int(dead.sum())} of {len(dead)} neurons "
                            f"(from {', '.join(node_label(leaf) for leaf in leaves)}).")
    if not replacements:
        return PassResult(model, False, explanations)
    for init in model.graph.initializer:
        if init.name in replacements:
            init.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(replacements[init.name]), init.name))
    keep_info = [info for info in model.graph.value_info if info.name not in stale]
    del model.graph.value_info[:]
    model.graph.value_info.extend(keep_info)
    remove_unused_initializers(model.graph)
    return PassResult(model, True, explanations)
