"""Insert dynamic-k expert routers in front of MLP down projections (D2DMoE).

Math, for a gated MLP ``y = h @ W_down`` with ``h = act(x @ W_gate) * (x @ W_up)``, whose
I intermediate neurons are grouped into E experts (``expert[i]`` is neuron i's expert)::

    s   = Relu(x @ R + b)                      predicted output norm of each expert [.., E]
    c   = tau * max_e s_e                      dynamic-k rule (threshold)
      or  k-th largest s_e                     top-k rule
    m_e = [s_e >= c]                           experts that run for this token
    y   = (h * m[expert]) @ W_down             the other experts' neurons contribute nothing

``m[expert]`` is a ``Gather`` of the expert mask along its last axis by the neuron ->
expert index, so the grouping needs no reordering of the weights. Everything is standard
ONNX (MatMul, Add, Relu, ReduceMax or TopK/ReduceMin, Mul, GreaterOrEqual, Cast, Gather),
so onnxruntime runs the result and TVM's ONNX importer reads it.

Precondition: ``x`` and ``h`` are tensors of the model with the same leading axes (token
rows); ``h`` is the input of the down projection. Postcondition: every consumer of ``h``
reads ``{h}_routed`` instead; ``{h}_expert_scores`` and ``{h}_experts`` (1.0 where the
expert runs, else 0.0), both float [.., E], exist in the graph so the routing can be measured; the threshold rule's
tau is the initializer ``{h}_tau``. The model is no longer the original (that is the point).

``find_expert_routers`` reads the routers of a model back as ``Router`` parameters (a
router is exactly the nodes and constants this pass emits for them), and
``remove_expert_routers`` takes them out again, so another export of the same model can
be given the same routers (``sparsify --like``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from passes.base import Graph, PassResult


@dataclass(frozen=True)
class Router:
    """One MLP's router: ``hidden`` is the MLP input x, ``neurons`` the down projection's
    input h; ``weight`` [H, E] and ``bias`` [E] predict the experts' output norms."""

    hidden: str
    neurons: str
    weight: np.ndarray
    bias: np.ndarray
    expert_of_neuron: np.ndarray
    tau: float | None = None
    top_k: int | None = None


def tensor_names(neurons: str) -> dict[str, str]:
    """The names the pass gives its tensors for the MLP whose down input is ``neurons``."""
    return {"scores": f"{neurons}_expert_scores", "mask": f"{neurons}_experts", "routed": f"{neurons}_routed",
            "tau": f"{neurons}_tau", "top_k": f"{neurons}_top_k", "weight": f"{neurons}_router_weight",
            "bias": f"{neurons}_router_bias", "expert_of_neuron": f"{neurons}_expert_of_neuron"}


def _default_opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)


def _router_nodes(router: Router, opset: int) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    names = tensor_names(router.neurons)
    prefix = router.neurons
    constants = [numpy_helper.from_array(router.weight.astype(np.float32), names["weight"]),
                 numpy_helper.from_array(router.bias.astype(np.float32), names["bias"]),
                 numpy_helper.from_array(router.expert_of_neuron.astype(np.int64), names["expert_of_neuron"]),
                 numpy_helper.from_array(np.array([-1], np.int64), f"{prefix}_last_axis")]
    nodes = [helper.make_node("MatMul", [router.hidden, names["weight"]], [f"{prefix}_router_linear"]),
             helper.make_node("Add", [f"{prefix}_router_linear", names["bias"]], [f"{prefix}_router_biased"]),
             helper.make_node("Relu", [f"{prefix}_router_biased"], [names["scores"]])]

    def reduce(op: str, source: str, output: str) -> onnx.NodeProto:
        if opset >= 18:  # axes became an input in opset 18
            return helper.make_node(op, [source, f"{prefix}_last_axis"], [output], keepdims=1)
        return helper.make_node(op, [source], [output], axes=[-1], keepdims=1)

    if router.top_k is not None:
        constants.append(numpy_helper.from_array(np.array([router.top_k], np.int64), names["top_k"]))
        nodes += [helper.make_node("TopK", [names["scores"], names["top_k"]], [f"{prefix}_top_scores", f"{prefix}_top_indices"], axis=-1),
                  reduce("ReduceMin", f"{prefix}_top_scores", f"{prefix}_cutoff")]
    else:
        constants.append(numpy_helper.from_array(np.array(router.tau, np.float32), names["tau"]))
        nodes += [reduce("ReduceMax", names["scores"], f"{prefix}_max_score"),
                  helper.make_node("Mul", [f"{prefix}_max_score", names["tau"]], [f"{prefix}_cutoff"])]
    nodes += [helper.make_node("GreaterOrEqual", [names["scores"], f"{prefix}_cutoff"], [f"{prefix}_expert_runs"]),
              helper.make_node("Cast", [f"{prefix}_expert_runs"], [names["mask"]], to=onnx.TensorProto.FLOAT),
              helper.make_node("Gather", [names["mask"], names["expert_of_neuron"]], [f"{prefix}_neuron_keep"], axis=-1),
              helper.make_node("Mul", [router.neurons, f"{prefix}_neuron_keep"], [names["routed"]])]
    for index, node in enumerate(nodes):
        node.name = f"{prefix}_router_{index}"
    return nodes, constants


def insert_expert_routers(model: onnx.ModelProto, routers: list[Router]) -> PassResult:
    """Routes the down projection input of every MLP in ``routers`` (module docstring)."""
    if not routers:
        return PassResult(model, False)
    opset = _default_opset(model)
    pending = {}
    explanations = []
    for router in routers:
        nodes, constants = _router_nodes(router, opset)
        pending[router.neurons] = nodes
        model.graph.initializer.extend(constants)
        rule = f"top {router.top_k}" if router.top_k is not None else f"s >= {router.tau:.4g} * max s"
        explanations.append(f"insert_expert_routers: {router.neurons} -> {router.weight.shape[1]} experts, {rule}.")
    renamed = {neurons: tensor_names(neurons)["routed"] for neurons in pending}
    new_nodes = []
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            if name in renamed:
                node.input[i] = renamed[name]
        new_nodes.append(node)
        for output in node.output:
            if output in pending:
                new_nodes.extend(pending.pop(output))
    if pending:
        raise ValueError(f"insert_expert_routers: no node produces {', '.join(pending)}")
    del model.graph.node[:]
    model.graph.node.extend(new_nodes)
    return PassResult(model, True, explanations)


def set_tau(model: onnx.ModelProto, neurons: str, tau: float) -> None:
    """Replaces the threshold rule's tau of the router in front of ``neurons``."""
    name = tensor_names(neurons)["tau"]
    init = next(i for i in model.graph.initializer if i.name == name)
    init.CopyFrom(numpy_helper.from_array(np.array(tau, np.float32), name))


def find_expert_routers(model: onnx.ModelProto) -> list[Router]:
    """The routers ``insert_expert_routers`` put in ``model``, in graph order, with the
    parameters it was given. A MatMul reading ``{h}_router_weight`` starts a candidate;
    it is a router only if the model holds exactly the nodes and constants the pass
    emits for the parameters read back (a router edited since is not one)."""
    graph = Graph(model.graph)
    opset = _default_opset(model)
    suffix = tensor_names("")["weight"]

    def constant(name: str) -> np.ndarray | None:
        return numpy_helper.to_array(graph.initializers[name]) if name in graph.initializers else None

    def holds(expected: onnx.TensorProto) -> bool:
        value, want = constant(expected.name), numpy_helper.to_array(expected)
        return value is not None and value.dtype == want.dtype and np.array_equal(value, want)

    routers = []
    for node in model.graph.node:
        if node.op_type != "MatMul" or len(node.input) != 2 or not node.input[1].endswith(suffix):
            continue
        neurons = node.input[1][:-len(suffix)]
        names = tensor_names(neurons)
        weight, bias, experts, tau, top_k = (constant(names[key]) for key in ("weight", "bias", "expert_of_neuron", "tau", "top_k"))
        if weight is None or bias is None or experts is None or (tau is None) == (top_k is None):
            continue
        router = Router(node.input[0], neurons, weight, bias, experts,
                        None if tau is None else float(tau), None if top_k is None else int(top_k.reshape(-1)[0]))
        nodes, constants = _router_nodes(router, opset)
        if all(graph.producers.get(n.output[0]) == n for n in nodes) and all(holds(c) for c in constants):
            routers.append(router)
    return routers


def remove_expert_routers(model: onnx.ModelProto, routers: list[Router]) -> PassResult:
    """Undoes ``insert_expert_routers`` for ``routers`` (as ``find_expert_routers`` reads
    them): their nodes and constants go, and every reader of ``{h}_routed`` reads ``h``."""
    if not routers:
        return PassResult(model, False)
    opset = _default_opset(model)
    dropped_nodes, dropped_constants = set(), set()
    for router in routers:
        nodes, constants = _router_nodes(router, opset)
        dropped_nodes.update(node.output[0] for node in nodes)
        dropped_constants.update(constant.name for constant in constants)
    restored = {tensor_names(router.neurons)["routed"]: router.neurons for router in routers}
    kept = [node for node in model.graph.node if node.output[0] not in dropped_nodes]
    for node in kept:
        for i, name in enumerate(node.input):
            node.input[i] = restored.get(name, name)
    del model.graph.node[:]
    model.graph.node.extend(kept)
    initializers = [init for init in model.graph.initializer if init.name not in dropped_constants]
    del model.graph.initializer[:]
    model.graph.initializer.extend(initializers)
    return PassResult(model, True, [f"remove_expert_routers: {router.neurons} is read directly again." for router in routers])
