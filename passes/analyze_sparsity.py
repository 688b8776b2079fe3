"""Find the sparsity of every linear layer's constant weight.

For each ``MatMul`` or ``Gemm`` whose weight operand is constant (an initializer, a
Constant node, a ``Transpose`` of one, or a ``weight * mask`` product that
``fold_pruning_masks`` would fold), this analysis reports the weight as [K, N] for
``y = x @ W``, its fraction of zeros, the block structure of its zeros, and the bytes it
takes dense and in the cheapest sparse format (``passes.sparse_formats``).

It changes nothing; ``sparsecc inspect`` prints it, and later passes use it to decide.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import numpy as np
import onnx

from passes import fold_pruning_masks as fold
from passes.base import Graph, attribute, node_label
from passes.quantized_weights import matmul_nbits_weight, quantized_weight
from passes.sparse_formats import block_structure, choose_format


@dataclass(frozen=True)
class LayerSparsity:
    """One linear layer's weight, as ``y = x @ W`` with W of shape [K, N]."""

    node: str
    op: str
    weight: str
    shape: tuple[int, int]
    sparsity: float
    block: str
    dense_bytes: int
    best_format: str
    best_bytes: int
    #: the weight's value dtype (``formats.quant.WEIGHT_DTYPES``); a quantized weight's
    #: sparsity is that of its dequantized values, and its best bytes are its codes'.
    dtype: str = "fp32"

    def to_dict(self) -> dict:
        return {**asdict(self), "shape": list(self.shape)}


@dataclass(frozen=True)
class SparsityReport:
    layers: list[LayerSparsity]

    @property
    def dense_bytes(self) -> int:
        return sum(layer.dense_bytes for layer in self.layers)

    @property
    def best_bytes(self) -> int:
        return sum(layer.best_bytes for layer in self.layers)

    @property
    def sparsity(self) -> float:
        """Fraction of zeros over all analysed weights, weighted by size."""
        total = sum(layer.shape[0] * layer.shape[1] for layer in self.layers)
        zeros = sum(layer.sparsity * layer.shape[0] * layer.shape[1] for layer in self.layers)
        return zeros / total if total else 0.0

    def to_dict(self) -> dict:
        return {
            "layers": [layer.to_dict() for layer in self.layers],
            "totals": {
                "layers": len(self.layers),
                "sparsity": self.sparsity,
                "dense_bytes": self.dense_bytes,
                "best_bytes": self.best_bytes,
            },
        }


def constant_weight(name: str, graph: Graph) -> tuple[np.ndarray, str] | None:
    """The constant value behind ``name`` looking through Transpose and mask products."""
    value = graph.constant(name)
    if value is not None:
        return value, name
    producer = graph.producers.get(name)
    if producer is None:
        return None
    if producer.op_type == "Transpose":
        inner = constant_weight(producer.input[0], graph)
        if inner is None:
            return None
        perm = next((list(a.ints) for a in producer.attribute if a.name == "perm"), None)
        return np.transpose(inner[0], perm), inner[1]
    if producer.op_type == "Mul":
        outcome = fold.check(producer, graph)
        if isinstance(outcome, tuple):
            weight, mask = (graph.constant(n) for n in outcome)
            return weight * mask.astype(weight.dtype), outcome[0]
    return None


def _sparse_op_weight(node: onnx.NodeProto, graph: Graph) -> tuple[np.ndarray, str] | None:
    """The dense [K, N] weight behind a SparseMatMul or GatedMatMul node."""
    from passes.sparse_formats import decode
    from passes.sparse_ops import weight_operands

    _, format, names = weight_operands(node)
    arrays = [graph.constant(name) for name in names]
    if any(array is None for array in arrays):
        return None
    block = tuple(attribute(node, "block")) if format == "bsr" else None
    return decode(arrays, format, tuple(attribute(node, "shape")), block), names[-1]


def linear_weight(node: onnx.NodeProto, graph: Graph) -> tuple[np.ndarray, str] | None:
    """The [K, N] weight of a MatMul or Gemm node, or None when it is not constant 2-D."""
    if node.op_type in ("SparseMatMul", "GatedMatMul") and node.domain == "ai.sparsecc":
        return _sparse_op_weight(node, graph)
    if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2:
        return None
    found = constant_weight(node.input[1], graph)
    if found is None or found[0].ndim != 2:
        return None
    weight, name = found
    if node.op_type == "Gemm" and attribute(node, "transB", 0):
        weight = weight.T
    return weight, name


def analyze_sparsity(model: onnx.ModelProto) -> SparsityReport:
    """Reports every MatMul/Gemm with a constant 2-D weight, in graph order."""
    graph = Graph(model.graph)
    layers = []
    for node in model.graph.node:
        found = linear_weight(node, graph)
        quantized = None
        if found is None:
            quantized = _quantized(node, graph)
            if quantized is None:
                continue
            found = quantized.dequantize(), node.input[1]
        weight, name = found
        k, n = weight.shape
        choice = choose_format(weight)
        if quantized is not None:
            choice = replace(choice, format=quantized.dtype, block=None, bytes=quantized.nbytes())
        block, _ = block_structure(weight.T)
        layers.append(
            LayerSparsity(
                node=node_label(node),
                op=node.op_type,
                weight=name,
                shape=(int(k), int(n)),
                sparsity=float(1.0 - np.count_nonzero(weight) / weight.size),
                block=f"{block[0]}x{block[1]}" if block else "none",
                dense_bytes=choice.dense_bytes,
                best_format=f"bsr{choice.block[0]}x{choice.block[1]}" if choice.block else choice.format,
                best_bytes=choice.bytes,
                dtype=quantized.dtype if quantized is not None else "fp32",
            )
        )
    return SparsityReport(layers)


def _quantized(node: onnx.NodeProto, graph: Graph):
    """The ``formats.quant`` weight of a MatMul reading a quantized weight
    (``passes.quantize_weights``), or None."""
    if node.op_type == "MatMulNBits" and node.domain == "com.microsoft":
        found = matmul_nbits_weight(node, graph)
    elif node.op_type == "MatMul" and node.domain in ("", "ai.onnx") and len(node.input) == 2:
        found = quantized_weight(node.input[1], graph)
    else:
        return None
    return found[0] if isinstance(found, tuple) else None
