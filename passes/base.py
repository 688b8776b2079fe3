"""What every pass returns, and the graph queries the passes share."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper


@dataclass
class PassResult:
    """A pass's outcome.

    Attributes:
        model: the rewritten model (the input model itself when nothing changed).
        modified: whether the pass changed anything.
        explanations: one line per decision, with its reason, for ``--explain``.
    """

    model: onnx.ModelProto
    modified: bool
    explanations: list[str] = field(default_factory=list)


class Graph:
    """Read-only queries over an ONNX graph: constants, producers and consumers."""

    def __init__(self, graph: onnx.GraphProto):
        self.graph = graph
        self.initializers = {init.name: init for init in graph.initializer}
        self.constant_nodes = {
            node.output[0]: node
            for node in graph.node
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx")
        }
        self.producers = {out: node for node in graph.node for out in node.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in graph.node:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)
        self.graph_outputs = {out.name for out in graph.output}
        self.graph_inputs = {inp.name for inp in graph.input}

    def is_constant(self, name: str) -> bool:
        """True when ``name`` is an initializer or the output of a Constant node."""
        return (name in self.initializers and name not in self.graph_inputs) or name in self.constant_nodes

    def constant(self, name: str) -> np.ndarray | None:
        """The value of a constant tensor, or None when ``name`` is not constant."""
        if name in self.initializers and name not in self.graph_inputs:
            return numpy_helper.to_array(self.initializers[name])
        node = self.constant_nodes.get(name)
        if node is not None:
            for attr in node.attribute:
                if attr.name == "value":
                    return numpy_helper.to_array(attr.t)
        return None

    def why_not_constant(self, name: str) -> str:
        """A phrase saying why ``name`` is not a constant, for explanations."""
        if name in self.graph_inputs:
            return f"{name} is a graph input, not an initializer"
        producer = self.producers.get(name)
        if producer is not None:
            return f"{name} is computed by a {producer.op_type} node, not an initializer"
        return f"{name} is not a constant"


def attribute(node: onnx.NodeProto, name: str, default=None):
    """The value of a node's attribute, or ``default`` when it is not set."""
    return next((onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


def gemm_refusal(node: onnx.NodeProto) -> str | None:
    """Why a Gemm is not ``x @ op(B) + C`` (alpha = beta = 1, no transA), or None."""
    if attribute(node, "alpha", 1.0) != 1.0 or attribute(node, "beta", 1.0) != 1.0:
        return "alpha or beta is not 1"
    if attribute(node, "transA", 0):
        return "transA is set"
    return None


def node_label(node: onnx.NodeProto) -> str:
    """A readable name for a node in messages."""
    return node.name or f"{node.op_type}({', '.join(node.input)})"


def remove_unused_initializers(graph: onnx.GraphProto) -> None:
    """Drops initializers that no node, subgraph or output refers to any more."""
    used = {out.name for out in graph.output}

    def collect(nodes):
        for node in nodes:
            used.update(node.input)
            for attr in node.attribute:
                for sub in [attr.g, *attr.graphs] if attr.HasField("g") else attr.graphs:
                    collect(sub.node)

    collect(graph.node)
    keep = [init for init in graph.initializer if init.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)


def embedding_rows(model: onnx.ModelProto) -> int | None:
    """Rows of the embedding table that ``input_ids`` indexes, if there is one."""
    shapes = {init.name: list(init.dims) for init in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Gather" and len(node.input) > 1 and node.input[1] == "input_ids" and node.input[0] in shapes:
            return shapes[node.input[0]][0]
    return None
