"""The graph as the sparsification methods see it: linear layers and gated MLPs.

A linear layer is a MatMul/Gemm with a constant 2-D weight, ``y = x @ W``, ``W [K, N]``
(a Gemm with ``transB`` stores it as [N, K]; ``get_weight`` and ``set_weight`` always
speak [K, N]). The prunable ones (``linear_layers``) are all but the output projection,
whose result is a model output (``output_projection`` finds it for
``--prune-output-projection``). A gated MLP is ``down(act(gate x) * up x)`` with SiLU
(``Sigmoid`` times its input) or ReLU as ``act``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import onnx
from onnx import numpy_helper

from passes.base import Graph, attribute, gemm_refusal
from passes.insert_expert_routers import find_expert_routers, tensor_names
from runtime.errors import SparseccError


@dataclass(frozen=True)
class Linear:
    """A MatMul/Gemm whose weight is an initializer; ``transposed``: stored as [N, K]."""

    node: onnx.NodeProto
    weight: str
    input: str
    transposed: bool


def linear_layers(model: onnx.ModelProto) -> list[Linear]:
    """The prunable linear layers in graph order (one per distinct weight initializer);
    dynk's expert routers are not among them (they are fitted to the dense MLPs)."""
    graph = Graph(model.graph)
    layers = []
    # Router weights start out seen, so they are never listed.
    seen = {tensor_names(router.neurons)["weight"] for router in find_expert_routers(model)}
    for node in model.graph.node:
        if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2 or node.output[0] in graph.graph_outputs:
            continue
        name = node.input[1]
        if name not in graph.initializers or name in graph.graph_inputs or name in seen:
            continue
        if len(graph.initializers[name].dims) != 2 or (node.op_type == "Gemm" and gemm_refusal(node)):
            continue
        seen.add(name)
        layers.append(Linear(node, name, node.input[0], node.op_type == "Gemm" and bool(attribute(node, "transB", 0))))
    return layers


def output_projection(model: onnx.ModelProto) -> Linear:
    """The output projection: the MatMul or Gemm whose result is a model output, with its
    weight an initializer or a transposed initializer (a tied embedding table [N, K])."""
    graph = Graph(model.graph)
    for node in model.graph.node:
        if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2 or node.output[0] not in graph.graph_outputs:
            continue
        transposed = node.op_type == "Gemm" and bool(attribute(node, "transB", 0))
        name = node.input[1]
        producer = graph.producers.get(name)
        if producer is not None and producer.op_type == "Transpose" and list(attribute(producer, "perm", [1, 0])) == [1, 0]:
            name, transposed = producer.input[0], not transposed
        usable = name in graph.initializers and name not in graph.graph_inputs and len(graph.initializers[name].dims) == 2
        if usable and not (node.op_type == "Gemm" and gemm_refusal(node)):
            return Linear(node, name, node.input[0], transposed)
    raise SparseccError("--prune-output-projection: the model has no output projection (a MatMul or Gemm whose result "
                        "is a model output, with a constant 2-D weight).")


def get_weight(model: onnx.ModelProto, layer: Linear) -> np.ndarray:
    init = next(i for i in model.graph.initializer if i.name == layer.weight)
    weight = numpy_helper.to_array(init)
    return weight.T if layer.transposed else weight


def set_weight(model: onnx.ModelProto, layer: Linear, weight: np.ndarray) -> None:
    init = next(i for i in model.graph.initializer if i.name == layer.weight)
    stored = weight.T if layer.transposed else weight
    init.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(stored).astype(numpy_helper.to_array(init).dtype), layer.weight))


@dataclass(frozen=True)
class Mlp:
    """A gated MLP: down(act(gate(x)) * up(x)); ``act`` is the activation's output."""

    gate: Linear
    up: Linear
    down: Linear
    act: str
    silu: tuple[onnx.NodeProto, onnx.NodeProto] | None  # (Sigmoid, Mul) when act is SiLU


def mlp_blocks(model: onnx.ModelProto, layers: list[Linear]) -> list[Mlp]:
    """SwiGLU (or ReLU-gated) MLPs: a down projection reading Mul(act(gate x), up x)."""
    graph = Graph(model.graph)
    by_output = {layer.node.output[0]: layer for layer in layers}
    blocks = []
    for down in layers:
        product = graph.producers.get(down.input)
        if product is None or product.op_type != "Mul":
            continue
        for act_name, up_name in (tuple(product.input), tuple(product.input)[::-1]):
            act = graph.producers.get(act_name)
            if up_name not in by_output or act is None:
                continue
            if act.op_type == "Relu" and act.input[0] in by_output:
                blocks.append(Mlp(by_output[act.input[0]], by_output[up_name], down, act_name, None))
                break
            if act.op_type == "Mul":
                pair = tuple(act.input)
                found = None
                for x, s in (pair, pair[::-1]):
                    sigmoid = graph.producers.get(s)
                    if sigmoid is not None and sigmoid.op_type == "Sigmoid" and sigmoid.input[0] == x and x in by_output:
                        found = Mlp(by_output[x], by_output[up_name], down, act_name, (sigmoid, act))
                if found:
                    blocks.append(found)
                    break
    return blocks



def require_mlps(model: onnx.ModelProto, layers: list[Linear], method: str, source: str) -> list[Mlp]:
    """The gated MLPs among ``layers``; ``method`` (its name) needs at least one."""
    blocks = mlp_blocks(model, layers)
    if not blocks:
        raise SparseccError(f"{method} needs gated MLPs (down(act(gate x) * up x)); {source} has none.")
    return blocks


def weight_sparsity(model: onnx.ModelProto, layers: list[Linear]) -> dict:
    """Fraction of zeros over ``layers`` and per layer."""
    per_layer, zeros, total = {}, 0, 0
    for layer in layers:
        weight = get_weight(model, layer)
        per_layer[layer.weight] = float(1 - np.count_nonzero(weight) / weight.size)
        zeros += weight.size - np.count_nonzero(weight)
        total += weight.size
    return {"layers": per_layer, "sparsity": zeros / total if total else 0.0}


def match_by_shape(model: onnx.ModelProto, layers: list[Linear], shapes: list[tuple[int, int]],
                   refusal: Callable[[int], str]) -> list[Linear]:
    """The layer for each of ``shapes`` ([K, N]), in order: the next remaining layer of that
    shape. Raises ``refusal(i)`` when shape ``i`` finds none."""
    remaining = list(layers)
    matched = []
    for index, shape in enumerate(shapes):
        match = next((layer for layer in remaining if get_weight(model, layer).shape == tuple(shape)), None)
        if match is None:
            raise SparseccError(refusal(index))
        remaining = remaining[remaining.index(match) + 1:]
        matched.append(match)
    return matched

