"""Finds the decode step's attention in a graph and makes it one node of the target's.

The decode step of ``sparsecc export --decode`` computes, for every layer, attention of
one new token over a cache of ``S`` slots (keys stored transposed) plus itself::

    scores = Where(mask, MatMul(q, past_key) * scale, fill)      q [1, H, G, D], past_key [1, H, D, S]
    p      = Softmax(Concat(scores, new_score), axis=-1)        new_score [1, H, G, 1]
    out    = MatMul(p[..., :S], past_value) + MatMul(p[..., S:], new_value)
                                                                past_value [1, H, S, D], new_value [1, H, 1, D]

with ``mask`` [1, S] (or [S]) marking the filled slots and ``fill`` -inf or below -1e30,
so masked slots weigh exactly 0. These ten nodes become one
``{domain}.DecodeAttention(q, past_key, past_value, mask, new_score, new_value)`` with
attribute ``scale``, which the target's kernel computes reading only the filled slots
(``targets.cpu.attention``). ``new_score`` keeps the nodes that compute it.

Precondition: shapes inferred and constants folded (``compiler.simplify``). A graph in
which the pattern is not found exactly (another exporter, a batch of more than one, a
per-head mask) is left as it is.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from passes.base import Graph, attribute

DECODE_ATTENTION = "DecodeAttention"
FILL_BELOW = -1e30


@dataclass(frozen=True)
class Attention:
    """One matched decode attention: the fused node's inputs, its scale and the nodes it replaces."""

    inputs: tuple[str, str, str, str, str, str]
    scale: float
    output: str
    replaced: tuple[int, ...]


def _shape(model: onnx.ModelProto, name: str) -> list[int] | None:
    for info in list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output):
        if info.name == name:
            dims = [d.dim_value if d.HasField("dim_value") else -1 for d in info.type.tensor_type.shape.dim]
            return dims if all(d > 0 for d in dims) else None
    return None


def _scalar(graph: Graph, name: str) -> float | None:
    value = graph.constant(name)
    return float(value.reshape(-1)[0]) if value is not None and value.size == 1 else None


def _slice_range(graph: Graph, node: onnx.NodeProto, axis_size: int) -> tuple[int, int] | None:
    """(start, end) of a Slice along the last axis (of ``axis_size``) with step 1, or None."""
    if node.op_type != "Slice" or len(node.input) < 3:
        return None
    values = [graph.constant(name) if name else None for name in node.input[1:]]
    starts, ends = values[0], values[1]
    axes = values[2] if len(values) > 2 else None
    steps = values[3] if len(values) > 3 else None
    if starts is None or ends is None or starts.size != 1 or ends.size != 1:
        return None
    if axes is not None and (axes.size != 1 or int(axes.reshape(-1)[0]) not in (-1, 3)):
        return None
    if steps is not None and (steps.size != 1 or int(steps.reshape(-1)[0]) != 1):
        return None
    start, end = (int(np.clip(int(v.reshape(-1)[0]) + (axis_size if int(v.reshape(-1)[0]) < 0 else 0), 0, axis_size))
                  for v in (starts, ends))
    return start, end


def _match(softmax: onnx.NodeProto, model: onnx.ModelProto, graph: Graph, index: dict[int, int]) -> Attention | None:
    """The attention around ``softmax``, or None when the pattern does not hold exactly."""
    concat = graph.producers.get(softmax.input[0])
    if concat is None or concat.op_type != "Concat" or len(concat.input) != 2 or attribute(softmax, "axis", -1) not in (-1, 3):
        return None
    where, new_score = graph.producers.get(concat.input[0]), concat.input[1]
    if attribute(concat, "axis") not in (-1, 3) or where is None or where.op_type != "Where":
        return None
    mask, scaled_name, fill = where.input
    fill_value, scaled = _scalar(graph, fill), graph.producers.get(scaled_name)
    if fill_value is None or fill_value > FILL_BELOW or scaled is None or scaled.op_type != "Mul":
        return None
    scalars = [_scalar(graph, name) for name in scaled.input]
    if sorted(value is None for value in scalars) != [False, True]:  # one scalar, one tensor
        return None
    scale = next(value for value in scalars if value is not None)
    product = graph.producers.get(scaled.input[scalars.index(None)])
    if product is None or product.op_type != "MatMul":
        return None
    q, past_key = product.input
    q_shape, key_shape, mask_shape = _shape(model, q), _shape(model, past_key), _shape(model, mask)
    score_shape = _shape(model, new_score)
    if not (q_shape and key_shape and mask_shape and score_shape) or len(q_shape) != 4 or len(key_shape) != 4:
        return None
    _, heads, group, dim = q_shape
    slots = key_shape[3]
    if q_shape[0] != 1 or key_shape != [1, heads, dim, slots] or score_shape != [1, heads, group, 1]:
        return None
    if int(np.prod(mask_shape)) != slots or mask_shape[-1] != slots:
        return None
    readers = graph.consumers.get(softmax.output[0], [])
    ranges = [(_slice_range(graph, reader, slots + 1), reader) for reader in readers]
    past = next((reader for span, reader in ranges if span == (0, slots)), None)
    new = next((reader for span, reader in ranges if span == (slots, slots + 1)), None)
    if len(readers) != 2 or past is None or new is None:
        return None
    past_matmul = _only_reader(graph, past.output[0], "MatMul", 0)
    new_matmul = _only_reader(graph, new.output[0], "MatMul", 0)
    if past_matmul is None or new_matmul is None:
        return None
    past_value, new_value = past_matmul.input[1], new_matmul.input[1]
    if _shape(model, past_value) != [1, heads, slots, dim] or _shape(model, new_value) != [1, heads, 1, dim]:
        return None
    add = _only_reader(graph, past_matmul.output[0], "Add")
    if add is None or _only_reader(graph, new_matmul.output[0], "Add") is not add:
        return None
    inner = [product, scaled, where, concat, softmax, past, new, past_matmul, new_matmul]
    if any(output in graph.graph_outputs or (len(graph.consumers.get(output, [])) != 1 and node is not softmax)
           for node in inner for output in node.output):
        return None
    replaced = tuple(index[id(node)] for node in [*inner, add])
    return Attention((q, past_key, past_value, mask, new_score, new_value), scale, add.output[0], replaced)


def _only_reader(graph: Graph, tensor: str, op_type: str, position: int | None = None) -> onnx.NodeProto | None:
    """The one node reading ``tensor``, if it is an ``op_type`` reading it at ``position``."""
    readers = graph.consumers.get(tensor, [])
    if len(readers) != 1 or readers[0].op_type != op_type:
        return None
    if position is not None and (len(readers[0].input) <= position or readers[0].input[position] != tensor):
        return None
    return readers[0]


def fuse_decode_attention(model: onnx.ModelProto, domain: str) -> list[str]:
    """Replaces every decode attention of ``model`` by one ``domain.DecodeAttention`` node,
    in place; returns one explanation per fused attention."""
    graph = Graph(model.graph)
    index = {id(node): position for position, node in enumerate(model.graph.node)}
    matches = [found for node in model.graph.node if node.op_type == "Softmax"
               for found in [_match(node, model, graph, index)] if found is not None]
    if not matches:
        return []
    replaced = {position: found for found in matches for position in found.replaced}
    nodes = []
    for position, node in enumerate(model.graph.node):
        found = replaced.get(position)
        if found is None:
            nodes.append(node)
        elif position == found.replaced[-1]:  # where the Add was: every input is computed by then
            nodes.append(helper.make_node(DECODE_ATTENTION, list(found.inputs), [found.output], name=f"{found.output}_attention",
                                          domain=domain, scale=found.scale))
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    if not any(opset.domain == domain for opset in model.opset_import):
        model.opset_import.append(helper.make_opsetid(domain, 1))
    return [f"decode attention over {found.inputs[1]} -> one {DECODE_ATTENTION} kernel (reads only the filled cache slots)."
            for found in matches]
