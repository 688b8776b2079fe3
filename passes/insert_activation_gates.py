"""Insert ``ai.sparsecc.ActivationGate`` on the inputs of linear layers.

Math, for each distinct input tensor X of linear layers (attention q/k/v share one, the
MLP's gate/up share one, o and down have their own)::

    y = X @ W   ->   y = Gate(X) @ W,   Gate(X) = X * (|X| > t)

(the output projection, whose result is a model output, is left alone) with one
threshold ``t`` per tensor, chosen on calibration data as the quantile of |X|
that zeros the target fraction of its entries (TEAL's per-layer magnitude threshold;
``sparsify.calibration`` fits them).
When X comes straight from a ``Relu`` its zeros are already there: the gate is inserted
in ``relu`` mode (no threshold), so the kernels can skip them.

Precondition: linear weights are constants (MatMul, Gemm or SparseMatMul).
Postcondition: every such input goes through one gate; the model is no longer exactly the
original (that is the point), and the calibrated sparsity of each gate is reported.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from passes import sparse_ops
from passes.analyze_sparsity import linear_weight
from passes.base import Graph, PassResult
from runtime.errors import SparseccError

LINEAR_OPS = ("MatMul", "Gemm", "SparseMatMul")


def gated_inputs(model: onnx.ModelProto) -> dict[str, list[onnx.NodeProto]]:
    """Input tensor name -> the linear nodes (with constant weights) that read it."""
    graph = Graph(model.graph)
    found: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        # The output projection (whose result is the model's output) stays ungated, as
        # in TEAL: its errors reach the logits undamped.
        if node.op_type not in LINEAR_OPS or node.output[0] in graph.graph_outputs:
            continue
        if node.op_type == "SparseMatMul" or linear_weight(node, graph) is not None:
            found.setdefault(node.input[0], []).append(node)
    return found


def probe_session(model: onnx.ModelProto, tensors: list[str]):
    """An onnxruntime session of a copy of ``model`` that also outputs ``tensors``
    (graph optimisations off, so every intermediate tensor is computed as written)."""
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    existing = {out.name for out in probe.graph.output}
    for name in tensors:
        if name not in existing:
            probe.graph.output.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        return ProbeSession(ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"]))
    except Exception as exc:  # onnxruntime's own exception types (Fail, InvalidGraph, ...)
        raise SparseccError(f"onnxruntime cannot load the model to calibrate it ({_first_line(exc)}).") from None


def _first_line(exc: Exception) -> str:
    return next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)[:200]


class ProbeSession:
    """An onnxruntime session whose failures on the calibration data (inputs of another
    dtype or shape, a kernel onnxruntime lacks) are one sentence, not its exception."""

    def __init__(self, session):
        self.session = session

    def run(self, names, feed):
        try:
            return self.session.run(names, feed)
        except Exception as exc:
            raise SparseccError(f"onnxruntime cannot run the model on the calibration data ({_first_line(exc)}).") from None


def insert_activation_gates(model: onnx.ModelProto, thresholds: dict[str, float],
                            measured: dict[str, float] | None = None) -> PassResult:
    """Gates every linear input named in ``thresholds`` (inputs produced by a Relu get
    ``relu`` mode and need no threshold)."""
    graph = Graph(model.graph)
    consumers = gated_inputs(model)
    explanations: list[str] = []
    gates: dict[str, onnx.NodeProto] = {}
    for tensor, nodes in consumers.items():
        producer = graph.producers.get(tensor)
        relu = producer is not None and producer.op_type == "Relu"
        if tensor not in thresholds and not relu:
            continue
        gated = f"{tensor}_gated"
        if relu:
            gates[tensor] = sparse_ops.activation_gate_node(tensor, None, gated, "relu", name=f"{tensor}_gate")
            explanations.append(f"insert_activation_gates: {tensor} -> relu gate (zeros made by {producer.name or 'a Relu'}).")
        else:
            threshold_name = f"{tensor}_threshold"
            model.graph.initializer.append(numpy_helper.from_array(np.array([thresholds[tensor]], np.float32), threshold_name))
            gates[tensor] = sparse_ops.activation_gate_node(tensor, threshold_name, gated, "threshold", name=f"{tensor}_gate")
            sparsity = f", {measured[tensor]:.1%} zeros on calibration data" if measured and tensor in measured else ""
            explanations.append(f"insert_activation_gates: {tensor} -> threshold {thresholds[tensor]:.4g}{sparsity}, "
                                f"feeding {len(nodes)} linear layer(s).")
        for node in nodes:
            node.input[0] = gated
    if not gates:
        return PassResult(model, False, explanations)
    new_nodes = []
    for node in model.graph.node:
        new_nodes.append(node)
        for output in node.output:
            if output in gates:
                new_nodes.append(gates.pop(output))
    # Gates on graph inputs go first.
    new_nodes = list(gates.values()) + new_nodes
    del model.graph.node[:]
    model.graph.node.extend(new_nodes)
    sparse_ops.attach_reference_functions(model)
    return PassResult(model, True, explanations)
