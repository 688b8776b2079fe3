"""Gates the activation methods share: one threshold gate, and the exact gates behind MLPs.

``cats`` (and ``--like``) put a threshold ``ActivationGate`` after one tensor for all its
readers (``gate_tensor``). The MLP methods (``cats``, ``relu``, ``dynk``) make zeros in
front of each down projection; an exact gate (threshold 0) there lets the compiled down
projection skip them (``gate_down_projections``).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from passes import sparse_ops
from passes.base import remove_unused_initializers
from passes.insert_activation_gates import insert_activation_gates


def gate_tensor(model: onnx.ModelProto, tensor: str, threshold: float) -> None:
    """Inserts a threshold ActivationGate after ``tensor`` for all its consumers."""
    gated, threshold_name = f"{tensor}_gated", f"{tensor}_threshold"
    model.graph.initializer.append(numpy_helper.from_array(np.array([threshold], np.float32), threshold_name))
    gate = sparse_ops.activation_gate_node(tensor, threshold_name, gated, "threshold", name=f"{tensor}_gate")
    nodes = []
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            if name == tensor:
                node.input[i] = gated
        nodes.append(node)
        if tensor in node.output:
            nodes.append(gate)
    del model.graph.node[:]
    model.graph.node.extend(nodes)


def gate_down_projections(model: onnx.ModelProto, down_inputs: list[str], gates: dict[str, dict]) -> dict:
    """Exact gates on ``down_inputs`` (the down projections' inputs) and the reference
    functions of the gates; returns the method's summary, ``gates`` with their mean
    calibrated sparsity (None when no gate was calibrated)."""
    remove_unused_initializers(model.graph)
    insert_activation_gates(model, dict.fromkeys(down_inputs, 0.0))
    sparse_ops.attach_reference_functions(model)
    calibrated = [g["calibrated"] for g in gates.values() if "calibrated" in g]
    return {"gates": gates, "sparsity": float(np.mean(calibrated)) if calibrated else None}
