"""Rewrite linear layers with sparse constant weights into ``ai.sparsecc.SparseMatMul``.

Math::

    y = x @ W            ->   y = SparseMatMul[format](x, encode(W))
    y = x @ op(B) + C    ->   y = SparseMatMul[format](x, encode(op(B))) + C   (Gemm)

where ``format`` is what ``passes.sparse_formats.decide`` predicts fastest at batch 1 on
the target whose kernel costs it is given (bytes moved, from ``formats/``, over each
kernel's efficiency), among the formats that target's sparse kernel takes: CSR with int16
or int32 indices, BSR with the block shape found in the zeros, or a bitmask. A layer stays
a dense ``MatMul`` unless a sparse kernel is predicted at least ``MIN_PREDICTED_SPEEDUP``
faster; every decision is explained, naming the target whose costs made it.

Precondition: weights are initializers (run after ``fold_pruning_masks`` and
``simplify_shapes``). Postcondition: the same function (exact: the sparse formats store
every nonzero and drop only zeros); the reference functions of the new ops are attached.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

import formats
from passes import sparse_ops
from passes.analyze_sparsity import linear_weight
from passes.base import Graph, PassResult, gemm_refusal, node_label, remove_unused_initializers
from passes.sparse_formats import KernelCosts, decide


def dense_to_sparse(model: onnx.ModelProto, costs: KernelCosts) -> PassResult:
    """Replaces every linear layer whose weight is predicted faster sparse on the target
    whose kernel ``costs`` are given."""
    graph = Graph(model.graph)
    explanations: list[str] = []
    new_nodes: list[onnx.NodeProto] = []
    encoded: dict[str, list[str]] = {}
    rewritten = 0
    for node in model.graph.node:
        if node.op_type not in ("MatMul", "Gemm") or node.domain not in ("", "ai.onnx"):
            new_nodes.append(node)
            continue
        refusal = gemm_refusal(node) if node.op_type == "Gemm" else None
        found = None if refusal else linear_weight(node, graph)
        if found is None:
            if refusal or graph.is_constant(node.input[1]) or node.input[1] in graph.producers:
                reason = refusal or f"its weight is not a constant matrix ({graph.why_not_constant(node.input[1])})"
                explanations.append(f"dense_to_sparse: {node_label(node)} kept: {reason}.")
            new_nodes.append(node)
            continue
        weight, source = found
        if weight.dtype != np.float32:
            explanations.append(f"dense_to_sparse: {node_label(node)} kept: weight is {weight.dtype}, not float32.")
            new_nodes.append(node)
            continue
        k, n = weight.shape
        sparsity = 1.0 - np.count_nonzero(weight) / weight.size
        decision = decide(weight, costs)
        explanations.append(f"dense_to_sparse: {source} [{k}x{n}] {sparsity:.1%} zeros -> {decision.reason}.")
        if decision.format == "dense":
            new_nodes.append(node)
            continue
        key = f"{source}:{node.input[1]}:{node.op_type}"
        if key not in encoded:
            format = formats.get(decision.format)
            arrays = format.encode(weight, decision.block)
            names = [f"{source}.{decision.format}.{part}" for part in format.arrays]
            model.graph.initializer.extend(numpy_helper.from_array(a, nm) for a, nm in zip(arrays, names))
            encoded[key] = names
        has_bias = node.op_type == "Gemm" and len(node.input) > 2 and node.input[2]
        output = node.output[0] + "_sparse" if has_bias else node.output[0]
        new_nodes.append(sparse_ops.sparse_matmul_node(
            node.input[0], encoded[key], output, decision.format, (k, n), decision.block,
            name=(node.name or node.output[0]) + "_sparse"))
        if has_bias:
            new_nodes.append(helper.make_node("Add", [output, node.input[2]], [node.output[0]], name=(node.name or output) + "_bias"))
        rewritten += 1
    if not rewritten:
        return PassResult(model, False, explanations)
    del model.graph.node[:]
    model.graph.node.extend(new_nodes)
    remove_unused_initializers(model.graph)
    sparse_ops.attach_reference_functions(model)
    return PassResult(model, True, explanations)
