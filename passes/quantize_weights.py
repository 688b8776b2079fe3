"""Quantize the weights of linear layers, and read quantized weights back from a graph.

Math (``formats.quant``: groups of 32 inputs along K, float16 scales)::

    y = x @ W            ->   y = x @ DequantizeLinear(q, d, axis=0, block_size=32)
    y = x @ op(B) + C    ->   the same, then + C                                   (Gemm)

and for ``int4``, whose minimum no integer zero point represents,
``W = DequantizeLinear(q, d) + DequantizeLinear(ones, m)``. An embedding lookup whose table
``E`` is tied to a quantized output projection (``W = E^T``) reads ``Transpose(W')``. The graph stays standard ONNX
(opset 21), so onnxruntime runs the quantized model the compiled one is checked against.

``passes.quantized_weights`` reads such weights back (and those other tools write).

Precondition: weights are initializers (after ``simplify_shapes``). Postcondition: each
quantized layer computes ``x @ W'`` with ``|W - W'| <= d / 2`` elementwise; pruned zeros
stay exact zeros for ``int8`` and ``int4sym``.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from formats import quant
from passes.analyze_sparsity import linear_weight
from passes.base import Graph, PassResult, attribute, gemm_refusal, node_label, remove_unused_initializers

#: The opset whose DequantizeLinear takes ``block_size`` and int4 codes; the IR version
#: that has int4 types.
OPSET = 21
IR_VERSION = 10


def quantize_weights(model: onnx.ModelProto, dtype: str, overrides: dict[str, str] | None = None,
                     group: int = quant.GROUP) -> PassResult:
    """Quantizes every linear layer with a constant float32 weight to ``dtype``.

    Args:
        dtype: a ``formats.quant.WEIGHT_DTYPES`` name; ``fp32`` changes nothing.
        overrides: weight (initializer) or node name -> dtype, for layers that differ.
        group: inputs per group.
    """
    overrides = overrides or {}
    graph = Graph(model.graph)
    explanations: list[str] = []
    # The dequantizing nodes read only initializers; they go first, so that an embedding
    # lookup early in the graph can read a table tied to the output projection at its end.
    weight_nodes: list[onnx.NodeProto] = []
    new_nodes: list[onnx.NodeProto] = []
    done: dict[tuple[str, bool], str] = {}
    originals: dict[str, np.ndarray] = {}
    existing = set(graph.initializers)
    used_overrides: set[str] = set()
    before = after = 0
    for node in model.graph.node:
        found = linear_weight(node, graph) if node.domain in ("", "ai.onnx") else None
        wanted = overrides.get(node.name) or (overrides.get(found[1]) if found else None) or dtype
        used_overrides.update(name for name in (node.name, found[1] if found else None) if name in overrides)
        if found is None or wanted == "fp32" or found[0].dtype != np.float32:
            new_nodes.append(node)
            continue
        refusal = gemm_refusal(node) if node.op_type == "Gemm" else None
        if refusal:
            explanations.append(f"quantize_weights: {node_label(node)} kept in fp32: {refusal}.")
            new_nodes.append(node)
            continue
        weight, source = found
        key = (node.input[1], node.op_type == "Gemm" and bool(attribute(node, "transB", 0)))
        if key not in done:
            try:
                quantized = quant.quantize(weight, wanted, group)
            except ValueError as exc:
                explanations.append(f"quantize_weights: {node_label(node)} kept in fp32: {exc}.")
                new_nodes.append(node)
                continue
            prefix = f"{source}_{wanted}"
            while prefix in existing:
                prefix = "_" + prefix
            nodes, inits = quant.onnx_nodes(quantized, prefix, prefix, existing)
            existing.update(init.name for init in inits)
            weight_nodes.extend(nodes)
            model.graph.initializer.extend(inits)
            done[key], originals[prefix] = prefix, weight
            k, n = weight.shape
            before += weight.nbytes
            after += quantized.nbytes()
            error = float(np.abs(quantized.dequantize() - weight).max())
            explanations.append(f"quantize_weights: {source} [{k}x{n}] -> {wanted} in groups of {group} "
                                f"({quantized.nbytes() / weight.size:.3f} bytes per weight; largest error {error:.3g}).")
        output = node.output[0]
        has_bias = node.op_type == "Gemm" and len(node.input) > 2 and node.input[2]
        product = output + "_product" if has_bias else output
        new_nodes.append(helper.make_node("MatMul", [node.input[0], done[key]], [product], name=node.name or output))
        if has_bias:
            new_nodes.append(helper.make_node("Add", [product, node.input[2]], [output], name=(node.name or output) + "_bias"))
    unknown = sorted(set(overrides) - used_overrides)
    if unknown:
        from runtime.errors import SparseccError

        raise SparseccError(f"--weight-dtype-for names no linear layer or weight of the model: {', '.join(unknown)}.")
    if not done:
        return PassResult(model, False, explanations or [f"quantize_weights: no float32 linear weight to quantize to {dtype}."])
    weight_nodes.extend(_tie_tables(new_nodes, graph, originals, explanations))
    del model.graph.node[:]
    model.graph.node.extend(weight_nodes + new_nodes)
    remove_unused_initializers(model.graph)
    _require_opset(model)
    explanations.append(f"quantize_weights: {len(done)} weights, {before / 1e6:.1f} MB -> {after / 1e6:.1f} MB.")
    return PassResult(model, True, explanations)


def _tie_tables(nodes: list[onnx.NodeProto], graph: Graph, originals: dict[str, np.ndarray],
                explanations: list[str]) -> list[onnx.NodeProto]:
    """Embedding lookups ``Gather(E, ids)`` whose table is tied to a quantized output
    projection (``W = E^T``) read the quantized table instead, ``Transpose(W')``, as a
    quantized model does (llama.cpp's too): one copy of the table, and the lookup and
    the projection agree. Rewrites ``nodes`` in place; returns the Transposes."""
    transposes = []
    tied: dict[str, str] = {}
    for node in nodes:
        if node.op_type != "Gather" or attribute(node, "axis", 0) != 0:
            continue
        table = graph.constant(node.input[0])
        if table is None or table.ndim != 2 or table.dtype != np.float32:
            continue
        match = next((name for name, weight in originals.items()
                      if weight.shape == table.shape[::-1] and np.array_equal(weight.T, table)), None)
        if match is None:
            continue
        if match not in tied:
            tied[match] = f"{match}_table"
            transposes.append(helper.make_node("Transpose", [match], [tied[match]], perm=[1, 0], name=f"{match}_table"))
        explanations.append(f"quantize_weights: {node_label(node)} looks up its rows in the quantized {match} "
                            f"(the embedding table is tied to that projection).")
        node.input[0] = tied[match]
    return transposes


def _require_opset(model: onnx.ModelProto) -> None:
    """Raises the default domain to ``OPSET`` (the ops a decoder uses mean the same from
    opset 18 on) and the IR version to one with int4 types."""
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx") and opset.version < OPSET:
            opset.version = OPSET
    model.ir_version = max(model.ir_version, IR_VERSION)
