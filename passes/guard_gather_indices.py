"""Every lookup in a constant table stays inside it, whatever its indices are.

``Gather(T, i, axis)`` reads ``T[..., i, ...]``; ONNX allows ``i`` in ``[-S, S)`` with
``S = T.shape[axis]`` (a negative index counts from the end). TVM's ``take`` and our
gather kernels do not check ``i``: an index past the table reads memory outside it (a
wrong answer, or a crash). Two cases, for each ``Gather`` or ``GatherElements`` whose
table is a constant:

- ``i = f(x)`` for a graph input ``x``, where ``f`` is a chain of ops that keep every value
  (Identity, Reshape, Flatten, Squeeze, Unsqueeze, Expand, Transpose, and a Cast to a type
  that holds every integer of ``[0, S)`` exactly). Then ``i`` lies in the table when
  ``x`` lies in ``[0, S)``: ``index_ranges`` returns those bounds, intersected over every
  table ``x`` reaches, for the manifest; the runtime refuses inputs outside them with one
  sentence before any kernel runs. (Negative ids are refused too: token ids never are.)
- ``i`` computed otherwise (an ``Add`` of a position, say). No input bound can be given,
  so this pass rewrites ``Gather(T, i) -> Gather(T, Mod(i, S))`` with ``fmod = 0``
  (floor modulo): ``Mod(i, S) = i`` for ``i`` in ``[0, S)`` and ``i + S`` for ``i`` in
  ``[-S, 0)``, exactly ONNX's meaning of a valid index, and it lies in ``[0, S)`` for every
  ``i``, so the read stays in the table. A valid model computes the same; an index
  outside ``[-S, S)`` (an error in onnxruntime) reads some row of the table.

Constant indices are checked here: one outside ``[-S, S)`` is refused at compile time.

Precondition: shapes of constant tables are known (initializers or Constant nodes).
Postcondition: every lookup of a constant table reads constant indices inside it, indices
``index_ranges`` bounds by an input range, or ``Mod``-wrapped indices.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from passes.base import Graph, PassResult, attribute, node_label
from runtime.errors import SparseccError

LOOKUPS = ("Gather", "GatherElements")
# Ops whose output holds only values of their first input.
VALUE_KEEPING = ("Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Expand", "Transpose")
# For a Cast's target type, the largest S such that every integer of [0, S) is exact in it.
EXACT_BELOW = {
    TensorProto.INT64: 1 << 63, TensorProto.UINT64: 1 << 64, TensorProto.INT32: 1 << 31,
    TensorProto.UINT32: 1 << 32, TensorProto.INT16: 1 << 15, TensorProto.UINT16: 1 << 16,
    TensorProto.INT8: 1 << 7, TensorProto.UINT8: 1 << 8, TensorProto.DOUBLE: (1 << 53) + 1,
    TensorProto.FLOAT: (1 << 24) + 1, TensorProto.FLOAT16: (1 << 11) + 1, TensorProto.BFLOAT16: (1 << 8) + 1,
}


def _table_rows(node: onnx.NodeProto, graph: Graph) -> int | None:
    """S, the extent of the looked-up axis, when ``node`` is a lookup in a constant table."""
    if node.op_type not in LOOKUPS or node.domain not in ("", "ai.onnx") or len(node.input) < 2:
        return None
    table = node.input[0]
    if table in graph.initializers and table not in graph.graph_inputs:
        shape = list(graph.initializers[table].dims)
    elif table in graph.constant_nodes:
        shape = list(graph.constant(table).shape)
    else:
        return None
    axis = attribute(node, "axis", 0)
    if not -len(shape) <= axis < len(shape):
        raise SparseccError(f"{node_label(node)} looks up axis {axis} of {table}, which has {len(shape)} axes.")
    return int(shape[axis])


def _source_input(name: str, rows: int, graph: Graph) -> str | None:
    """The graph input whose values ``name`` holds unchanged (for indices below ``rows``)."""
    while name not in graph.graph_inputs:
        producer = graph.producers.get(name)
        if producer is None or not producer.input:
            return None
        if producer.op_type == "Cast":
            if rows > EXACT_BELOW.get(attribute(producer, "to"), 0):
                return None
        elif producer.op_type not in VALUE_KEEPING:
            return None
        name = producer.input[0]
    return name


def index_ranges(model: onnx.ModelProto) -> dict[str, list[int]]:
    """``{input name: [0, S)}`` for every graph input that indexes a constant table, with
    ``S`` the smallest table it reaches; the runtime checks inputs against these."""
    graph = Graph(model.graph)
    ranges: dict[str, list[int]] = {}
    for node in model.graph.node:
        rows = _table_rows(node, graph)
        source = _source_input(node.input[1], rows, graph) if rows is not None else None
        if source is not None:
            ranges = intersect_ranges(ranges, {source: [0, rows]})
    return ranges


def intersect_ranges(*ranges: dict[str, list[int]]) -> dict[str, list[int]]:
    """One ``{input: [low, high)}`` holding, per input, the values every one of ``ranges`` allows."""
    merged: dict[str, list[int]] = {}
    for bounds in ranges:
        for name, (low, high) in bounds.items():
            known = merged.get(name, [low, high])
            merged[name] = [max(low, known[0]), min(high, known[1])]
    return merged


def _unique(base: str, taken: set[str]) -> str:
    name, count = base, 1
    while name in taken:
        count += 1
        name = f"{base}_{count}"
    taken.add(name)
    return name


def guard_gather_indices(model: onnx.ModelProto) -> PassResult:
    """Wraps computed indices of constant-table lookups into the table (see the module
    docstring); refuses constant indices outside it.

    Raises:
        SparseccError: when a lookup's constant indices lie outside its table.
    """
    graph = Graph(model.graph)
    explanations: list[str] = []
    taken = {name for node in model.graph.node for name in (*node.input, *node.output)}
    taken |= {init.name for init in model.graph.initializer} | graph.graph_inputs
    wrapped: dict[tuple[str, int], str] = {}  # (indices, S) -> the wrapped indices
    rewritten = []
    for node in model.graph.node:
        rows = _table_rows(node, graph)
        if rows is None:
            rewritten.append(node)
            continue
        indices = node.input[1]
        label = node_label(node)
        if graph.is_constant(indices):
            values = graph.constant(indices)
            outside = values[(values < -rows) | (values >= rows)]
            if outside.size:
                raise SparseccError(f"{label} reads index {int(outside.flat[0])} of {node.input[0]}, which has {rows} rows.")
            rewritten.append(node)
            continue
        source = _source_input(indices, rows, graph)
        if source is not None:
            explanations.append(f"{label}: indices are input {source!r}, checked at run time to lie in [0, {rows}).")
            rewritten.append(node)
            continue
        if (indices, rows) not in wrapped:
            # Mod takes two inputs of one type: the indices as int64 (exact for int32 too).
            rows_name = _unique(f"{indices}_rows_{rows}", taken)
            model.graph.initializer.append(numpy_helper.from_array(np.array(rows, np.int64), rows_name))
            as_int64 = _unique(f"{indices}_int64", taken)
            wrapped[(indices, rows)] = _unique(f"{indices}_within_{rows}", taken)
            prefix = node.name or indices
            rewritten.append(helper.make_node("Cast", [indices], [as_int64], to=TensorProto.INT64, name=f"{prefix}_cast"))
            rewritten.append(helper.make_node("Mod", [as_int64, rows_name], [wrapped[(indices, rows)]], fmod=0,
                                              name=f"{prefix}_guard"))
        producer = graph.producers.get(indices)
        explanations.append(f"{label}: indices are computed by {producer.op_type if producer else 'something else'}, "
                            f"so they are wrapped into the table's {rows} rows (Mod).")
        guarded = onnx.NodeProto()
        guarded.CopyFrom(node)
        guarded.input[1] = wrapped[(indices, rows)]
        rewritten.append(guarded)
    if not wrapped:
        return PassResult(model, False, explanations)
    del model.graph.node[:]
    model.graph.node.extend(rewritten)
    return PassResult(model, True, explanations)

