"""Fold constant pruning masks into their weights.

Math::

    y = (W * M) x   ->   y = W' x,   W' = W * M

where ``M`` is a constant tensor of zeros and ones and ``W`` a constant weight of the same
shape. This is the form that ``torch.nn.utils.prune`` exports (``weight_orig *
weight_mask``), and the one a user gets by multiplying a mask in by hand.

Precondition: none; nodes that do not match are left alone and the reason is recorded.
Postcondition: no ``Mul`` of a constant weight by a constant 0/1 mask of the same shape
remains; the folded weight is bit-identical to ``W * M`` (exact: multiplying by 1 or 0
introduces no rounding), and the old weight and mask initializers are removed when nothing
else uses them.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from passes.base import Graph, PassResult, node_label, remove_unused_initializers


def _is_binary_mask(value: np.ndarray) -> bool:
    return value.size > 0 and bool(np.all((value == 0) | (value == 1)))


def _folded_name(weight_name: str, taken: set[str]) -> str:
    base = weight_name[: -len("_orig")] if weight_name.endswith("_orig") else weight_name + "_masked"
    name, suffix = base, 1
    while name in taken:
        name, suffix = f"{base}_{suffix}", suffix + 1
    return name


def check(node: onnx.NodeProto, graph: Graph) -> tuple[str, str] | str:
    """Returns (weight name, mask name) when ``node`` folds, else the reason it does not."""
    if node.op_type != "Mul" or node.domain not in ("", "ai.onnx") or len(node.input) != 2:
        return "not a Mul"
    left, right = node.input
    for name in (left, right):
        if not graph.is_constant(name):
            return f"{graph.why_not_constant(name)}"
    left_value, right_value = graph.constant(left), graph.constant(right)
    if left_value.shape != right_value.shape:
        return f"mask and weight shapes differ ({left_value.shape} vs {right_value.shape})"
    if not np.issubdtype(left_value.dtype, np.floating):
        return f"{left} is {left_value.dtype}, not a floating-point weight"
    # The mask is the binary operand; when both are binary, torch's naming decides.
    right_binary, left_binary = _is_binary_mask(right_value), _is_binary_mask(left_value)
    if right_binary and (not left_binary or "mask" in right):
        return left, right
    if left_binary:
        return right, left
    return "neither operand is a 0/1 mask"


def fold_pruning_masks(model: onnx.ModelProto) -> PassResult:
    """Folds every constant ``weight * mask`` product into a single weight initializer."""
    graph = Graph(model.graph)
    explanations: list[str] = []
    taken = set(graph.initializers) | set(graph.producers)
    new_nodes: list[onnx.NodeProto] = []
    folded = 0
    for node in model.graph.node:
        outcome = check(node, graph) if node.op_type == "Mul" else None
        if not isinstance(outcome, tuple):
            # Only a Mul with an operand that looks like a mask (a 0/1 constant matrix, or
            # a tensor named like one) could have been a mask product.
            if outcome and any(
                "mask" in name or (graph.is_constant(name) and graph.constant(name).ndim >= 2
                                   and _is_binary_mask(graph.constant(name)))
                for name in node.input
            ):
                explanations.append(f"fold_pruning_masks: kept {node_label(node)}: {outcome}.")
            new_nodes.append(node)
            continue
        weight_name, mask_name = outcome
        weight, mask = graph.constant(weight_name), graph.constant(mask_name)
        folded_value = (weight * mask.astype(weight.dtype)).astype(weight.dtype)
        # The Mul's output name is free once the Mul is gone.
        taken.discard(node.output[0])
        name = _folded_name(weight_name, taken)
        taken.add(name)
        model.graph.initializer.append(numpy_helper.from_array(folded_value, name))
        # Consumers keep reading the Mul's output name; renaming them is cheaper than an
        # Identity node and keeps the graph the same size.
        for consumer in graph.consumers.get(node.output[0], []):
            for index, value in enumerate(consumer.input):
                if value == node.output[0]:
                    consumer.input[index] = name
        for output in model.graph.output:
            if output.name == node.output[0]:
                new_nodes.append(onnx.helper.make_node("Identity", [name], [node.output[0]]))
        explanations.append(
            f"fold_pruning_masks: folded {mask_name} into {weight_name} -> {name} "
            f"({float((folded_value == 0).mean()):.1%} zeros)."
        )
        folded += 1
    if not folded:
        return PassResult(model, False, explanations)
    del model.graph.node[:]
    model.graph.node.extend(new_nodes)
    remove_unused_initializers(model.graph)
    return PassResult(model, True, explanations)
