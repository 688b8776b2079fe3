"""Fuse an activation gate with the linear layers it feeds into ``GatedMatMul``.

Math::

    g = Gate(x);  y_i = g @ W_i (+ b_i)   for i = 1..n
    ->   [y_1 | ... | y_n] = GatedMatMul(x, t, [W_1 | ... | W_n]);  y_i = Split(...)_i (+ b_i)

so the kernel skips the weight rows of inactive inputs, the gate is evaluated once for all
the layers that share it (q/k/v, gate/up), and the shared input is read once. Weights
of the same format are concatenated along N; when they are sparse (``SparseMatMul``) the
product is the dual-sparse one (sparse matrix x sparse vector).

Precondition: gates from ``insert_activation_gates``; linear weights constant.
Postcondition: the same function (the concatenated product computes the same sums);
a gate disappears once all its consumers are fused.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

import formats
from passes import sparse_ops
from passes.analyze_sparsity import linear_weight
from passes.base import Graph, PassResult, attribute, gemm_refusal, node_label, remove_unused_initializers
from passes.sparse_formats import KernelCosts, decide_gated


def _consumer_weight(node: onnx.NodeProto, graph: Graph):
    """(dense [K, N] weight, format, block, bias name) of a fusable linear consumer, or a reason."""
    if node.op_type == "SparseMatMul":
        shape = tuple(attribute(node, "shape"))
        block = tuple(attribute(node, "block")) if node.overload == "bsr" else None
        arrays = [graph.constant(name) for name in node.input[1:]]
        if any(a is None for a in arrays):
            return "its sparse weight arrays are not all constants"
        return formats.get(node.overload).decode(arrays, shape, block), node.overload, block, None
    if node.op_type == "Gemm" and gemm_refusal(node):
        return f"a Gemm whose {gemm_refusal(node)}"
    if node.op_type not in ("MatMul", "Gemm"):
        return f"a {node.op_type} is not a linear layer"
    found = linear_weight(node, graph)
    if found is None:
        return "its weight is not a constant matrix"
    bias = node.input[2] if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2] else None
    return found[0], "dense", None, bias


def fuse_gated_matmul(model: onnx.ModelProto, costs: KernelCosts) -> PassResult:
    """Fuses every ActivationGate whose consumers are all linear layers; a dense weight
    becomes dual-sparse where ``costs``'s target predicts its dual-sparse kernel faster."""
    graph = Graph(model.graph)
    explanations: list[str] = []
    replaced: dict[int, list[onnx.NodeProto]] = {}  # id of node -> nodes to emit instead
    removed: set[int] = set()
    for gate in (n for n in model.graph.node if n.domain == sparse_ops.DOMAIN and n.op_type == "ActivationGate"):
        consumers = graph.consumers.get(gate.output[0], [])
        weights = [_consumer_weight(node, graph) for node in consumers]
        refusals = [f"{node_label(n)} is {w}" if w.startswith("a ") else f"{node_label(n)}: {w}"
                    for n, w in zip(consumers, weights) if isinstance(w, str)]
        if not consumers or refusals or gate.output[0] in graph.graph_outputs or any(n.input[0] != gate.output[0] for n in consumers):
            reason = "; ".join(refusals) or "its output is used other than as a linear input"
            explanations.append(f"fuse_gated_matmul: {node_label(gate)} kept: {reason}.")
            continue
        mode = gate.overload
        threshold = gate.input[1] if mode == "threshold" else None
        groups: dict[tuple, list[int]] = {}
        for index, (matrix, format, block, _) in enumerate(weights):
            if format == "dense":
                # Behind a gate, a sparse weight pays off sooner than alone: both kernels
                # skip inactive rows, and only the active rows' bytes differ.
                decision = decide_gated(matrix, costs)
                explanations.append(f"fuse_gated_matmul: {node_label(consumers[index])} -> {decision.reason}.")
                format = decision.format
            groups.setdefault((format, block), []).append(index)
        emitted: list[onnx.NodeProto] = []
        for (format, block), members in groups.items():
            matrices = [weights[i][0] for i in members]
            widths = [m.shape[1] for m in matrices]
            combined = np.concatenate(matrices, axis=1) if len(matrices) > 1 else matrices[0]
            k, n = combined.shape
            stem = f"{gate.input[0]}.gated{len(emitted)}"
            arrays = formats.get(format).encode(combined, block)
            names = [f"{stem}.{format}.{part}" for part in formats.get(format).arrays]
            model.graph.initializer.extend(numpy_helper.from_array(a, nm) for a, nm in zip(arrays, names))
            outputs = []
            for i in members:
                node = consumers[i]
                outputs.append(node.output[0] + "_nobias" if weights[i][3] else node.output[0])
            fused = outputs[0] if len(members) == 1 else f"{stem}.out"
            emitted.append(sparse_ops.gated_matmul_node(gate.input[0], threshold, names, fused, mode, format, (k, n), block,
                                                        name=f"{stem}.matmul"))
            if len(members) > 1:
                split_sizes = f"{stem}.split"
                model.graph.initializer.append(numpy_helper.from_array(np.array(widths, np.int64), split_sizes))
                emitted.append(helper.make_node("Split", [fused, split_sizes], outputs, axis=-1, name=f"{stem}.split"))
            for i, output in zip(members, outputs):
                if weights[i][3]:
                    emitted.append(helper.make_node("Add", [output, weights[i][3]], [consumers[i].output[0]], name=f"{stem}.bias{i}"))
            explanations.append(
                f"fuse_gated_matmul: {node_label(gate)} + {', '.join(node_label(consumers[i]) for i in members)} -> "
                f"one {mode} GatedMatMul [{k}x{n}] ({format}{'' if format == 'dense' else ', dual-sparse'})."
            )
        removed.add(id(gate))
        removed.update(id(node) for node in consumers)
        # The fused nodes read only the gate's input and constants, so the first
        # consumer's place (consumers are in graph order) comes before every use.
        replaced[id(consumers[0])] = emitted
    if not removed:
        return PassResult(model, False, explanations)
    new_nodes = []
    for node in model.graph.node:
        if id(node) in replaced:
            new_nodes.extend(replaced[id(node)])
        elif id(node) not in removed:
            new_nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(new_nodes)
    remove_unused_initializers(model.graph)
    sparse_ops.attach_reference_functions(model)
    return PassResult(model, True, explanations)
