"""``sparsecc sparsify MODEL --like SPARSIFIED``: one export's sparsification copied onto another.

A model is exported more than once: a ``--seq-len 512`` graph to calibrate and to measure
perplexity on, a ``--decode`` step to generate with. The sparsification is computed once,
on the first, and copied onto the others, so that they compute the same function:

* Weights. The prunable linear layers of both models (``sparsify.graph.linear_layers``)
  are matched in graph order by shape, as ``--mask`` matches its masks. Each layer of
  MODEL takes SPARSIFIED's weight ``W' = W * M``, which must equal MODEL's own ``W``
  wherever ``W' != 0``: a SPARSIFIED of another architecture or of other weights is
  refused, not misapplied. Structured pruning (``seap``, ``functional``) is whole rows and
  columns of zeros, copied with the rest; ``drop_dead_neurons`` removes them at compile time.
* SiLU made ReLU (``--activations relu``): the same MLPs (matched by their down projection).
* Activation gates. Each ``ActivationGate`` of SPARSIFIED is placed by what it reads: the
  input of a set of linear layers (``teal``, the exact gates on down projections), or the
  activation of an MLP (``cats``'s gate on the SiLU output). It is recreated at the matched
  place of MODEL with the same mode and the same float32 threshold.
* Expert routers (``dynk``). Each router of SPARSIFIED, as
  ``passes.insert_expert_routers.find_expert_routers`` reads it back, sits in front of an
  MLP's down projection and reads that MLP's input. It is taken out before the linear
  layers are counted (its MatMul is not one of the model's) and recreated by
  ``insert_expert_routers`` in front of the matched MLP of MODEL with the same weight,
  bias, neuron -> expert grouping and rule (tau or top-k): the nodes a direct
  ``--activations dynk`` writes. The exact gate on the routed down input is copied as any
  other gate.

A ``--decode`` export is two graphs, the decode step and the prefill step its metadata
names; both get the same sparsification, and OUTPUT's prefill graph (and tokenizer) are
written beside OUTPUT under OUTPUT's stem, so ``sparsecc compile OUTPUT`` builds both.

Precondition: MODEL has no activation gates. Postcondition: every linear weight, SiLU/ReLU
choice, gate and expert router of SPARSIFIED is in OUTPUT; on the tokens both graphs see,
OUTPUT computes what SPARSIFIED computes (up to float rounding of the two exports'
attention).
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from compiler.decode_export import DECODE_KEY, decoding_metadata
from compiler.onnx_io import load_model, save_model
from compiler.progress import SILENT, Progress
from passes import sparse_ops
from passes.base import Graph, remove_unused_initializers
from passes.insert_activation_gates import gated_inputs, insert_activation_gates
from passes.insert_expert_routers import Router, find_expert_routers, insert_expert_routers, remove_expert_routers
from runtime.errors import SparseccError
from sparsify.gates import gate_tensor
from sparsify.graph import get_weight, linear_layers, match_by_shape, mlp_blocks, set_weight, weight_sparsity
from sparsify.methods import SparsifyOptions
from sparsify.relu import silu_to_relu


@dataclass(frozen=True)
class GateSite:
    """Where a gate of the source sits: before the linear layers ``layers`` (indices in
    graph order), or on the activation of the MLP whose down projection is ``mlp_down``."""

    mode: str
    threshold: float | None
    layers: tuple[int, ...] = ()
    mlp_down: int | None = None


@dataclass(frozen=True)
class Sparsification:
    """What ``--like`` copies: the prunable weights ([K, N], graph order), the MLPs made
    ReLU (by their down projection's index), the gates, and the expert routers (by their
    MLP's down projection index; their tensor names are the source's)."""

    source: str
    weights: list[np.ndarray]
    relu_mlps: tuple[int, ...]
    gates: list[GateSite]
    routers: dict[int, Router]


def _strip_gates(model: onnx.ModelProto) -> list[tuple[onnx.NodeProto, list[str]]]:
    """Removes every ActivationGate, its readers reading its input again; returns each
    gate with the first outputs of the nodes that read it (names survive the rebuild of
    the node list, which copies the nodes)."""
    gates = [node for node in model.graph.node if node.op_type == "ActivationGate"]
    rename = {gate.output[0]: gate.input[0] for gate in gates}

    def resolve(name: str) -> str:
        while name in rename:
            name = rename[name]
        return name

    readers: dict[str, list[str]] = {gate.output[0]: [] for gate in gates}
    kept = [node for node in model.graph.node if node.op_type != "ActivationGate"]
    for node in kept:
        for i, name in enumerate(node.input):
            if name in rename:
                readers[name].append(node.output[0])
                node.input[i] = resolve(name)
    for gate in gates:
        gate.input[0] = resolve(gate.input[0])
    del model.graph.node[:]
    model.graph.node.extend(kept)
    return [(gate, readers[gate.output[0]]) for gate in gates]


def read_sparsification(path: str) -> Sparsification:
    """Reads SPARSIFIED and describes its sparsification by graph position."""
    model = load_model(path)
    gates = _strip_gates(model)
    routers = find_expert_routers(model)
    remove_expert_routers(model, routers)
    layers = linear_layers(model)
    if not layers:
        raise SparseccError(f"--like {path} has no linear layers with constant weights to copy.")
    blocks = mlp_blocks(model, layers)
    position = {layer.node.output[0]: i for i, layer in enumerate(layers)}
    down_of = {block.act: position[block.down.node.output[0]] for block in blocks}
    initializers = Graph(model.graph).initializers
    sites = []
    for gate, readers in gates:
        mode = gate.overload or "threshold"
        threshold = float(numpy_helper.to_array(initializers[gate.input[1]]).reshape(-1)[0]) if mode == "threshold" else None
        if readers and all(output in position for output in readers):
            sites.append(GateSite(mode, threshold, layers=tuple(sorted(position[output] for output in readers))))
        elif gate.input[0] in down_of:
            sites.append(GateSite(mode, threshold, mlp_down=down_of[gate.input[0]]))
        else:
            raise SparseccError(f"--like {path}: the gate {gate.name or gate.output[0]} reads {gate.input[0]}, which is "
                                f"neither the input of linear layers nor an MLP's activation, so it cannot be placed in another export.")
    relu = tuple(position[block.down.node.output[0]] for block in blocks if block.silu is None)
    routed = {}
    for router in routers:
        block = next((block for block in blocks if block.down.input == router.neurons), None)
        if block is None or block.gate.input != router.hidden:
            raise SparseccError(f"--like {path}: the expert router in front of {router.neurons} does not sit between "
                                "an MLP's input and its down projection, so it cannot be placed in another export.")
        routed[position[block.down.node.output[0]]] = router
    return Sparsification(path, [get_weight(model, layer) for layer in layers], relu, sites, routed)


def apply_sparsification(model: onnx.ModelProto, like: Sparsification, name: str) -> dict:
    """Copies ``like`` onto ``model`` (in place); returns the weight sparsity reached."""
    if any(node.op_type == "ActivationGate" for node in model.graph.node):
        raise SparseccError(f"{name} already has activation gates; --like applies to an export that is not sparsified yet.")
    layers = linear_layers(model)
    if len(layers) != len(like.weights):
        raise SparseccError(f"--like {like.source} has {len(like.weights)} prunable linear layers and {name} has "
                            f"{len(layers)}: they are not exports of the same model.")
    matched = match_by_shape(model, layers, [w.shape for w in like.weights],
                             lambda i: f"--like {like.source}: its linear layer {i} of shape {list(like.weights[i].shape)} "
                                       f"matches no remaining linear layer of {name}; they are not exports of the same model.")
    for index, (layer, weight) in enumerate(zip(matched, like.weights)):
        kept = weight != 0
        if not np.array_equal(get_weight(model, layer)[kept], weight[kept]):
            raise SparseccError(f"--like {like.source}: the weights its linear layer {index} keeps differ from {name}'s "
                                f"{layer.weight}; it was not sparsified from the same model.")
        set_weight(model, layer, weight)
    # The MLPs are found before any gate is inserted: a gate hides the pattern. Nodes are
    # known by their outputs, since rewriting the node list copies them.
    blocks = {block.down.node.output[0]: block for block in mlp_blocks(model, linear_layers(model))}

    def mlp(down: int):
        block = blocks.get(matched[down].node.output[0])
        if block is None:
            raise SparseccError(f"--like {like.source}: its linear layer {down} ends an MLP, but {name}'s {matched[down].weight} does not.")
        return block

    relu = [mlp(down) for down in like.relu_mlps]
    silu_to_relu(model, [block for block in relu if block.silu is not None])
    insert_expert_routers(model, [replace(router, hidden=mlp(down).gate.input, neurons=mlp(down).down.input)
                                  for down, router in like.routers.items()])
    # A router makes its down projection read the routed tensor: gates are placed by what
    # the layers read now.
    reads = {node.output[0]: node.input[0] for node in model.graph.node}
    thresholds = {}
    for site in like.gates:
        if site.mlp_down is not None:
            gate_tensor(model, mlp(site.mlp_down).act, site.threshold)
            continue
        tensors = {reads[matched[i].node.output[0]] for i in site.layers}
        if len(tensors) != 1:
            raise SparseccError(f"--like {like.source}: one of its gates feeds linear layers {list(site.layers)}, which read "
                                f"{len(tensors)} different tensors in {name}.")
        tensor = tensors.pop()
        readers = {node.output[0] for node in gated_inputs(model).get(tensor, [])}
        if readers != {matched[i].node.output[0] for i in site.layers}:
            raise SparseccError(f"--like {like.source}: in {name}, {tensor} feeds other linear layers than the gate's "
                                f"{list(site.layers)}; they are not exports of the same model.")
        if site.mode == "threshold":
            thresholds[tensor] = site.threshold
    insert_activation_gates(model, thresholds)
    remove_unused_initializers(model.graph)
    sparse_ops.attach_reference_functions(model)
    gates = sum(node.op_type == "ActivationGate" for node in model.graph.node)
    if gates != len(like.gates):
        raise SparseccError(f"--like {like.source} has {len(like.gates)} activation gates, but {gates} fit in {name}.")
    return weight_sparsity(model, matched)


def sparsify_like(options: SparsifyOptions, progress: Progress = SILENT) -> dict:
    """``options.model`` with the sparsification of ``options.like``; writes ``options.output``
    (and, for a ``--decode`` export, its prefill graph and tokenizer beside it)."""
    if options.weights or options.activations or options.mask:
        raise SparseccError("--like copies another model's sparsification; give it alone, without --weights, --activations or --mask.")
    start = time.perf_counter()
    with progress.step(f"reading the sparsification of {options.like}"):
        like = read_sparsification(options.like)
    with progress.step(f"loading {options.model}"):
        model = load_model(options.model)
    spec = decoding_metadata(model)
    output = Path(options.output)
    graphs = [(model, options.model, output)]
    if spec is not None:
        source = Path(options.model).parent
        stem = output.name[:-5] if output.name.endswith(".onnx") else output.name
        prefill_path = source / spec["prefill_model"]
        with progress.step(f"loading its prefill step {prefill_path}"):
            prefill = load_model(prefill_path)
        renamed = {"prefill_model": f"{stem}.prefill.onnx"}
        if spec.get("tokenizer"):
            renamed["tokenizer"] = f"{stem}.tokenizer.json"
            output.parent.mkdir(parents=True, exist_ok=True)
            if (source / spec["tokenizer"]).resolve() != (output.parent / renamed["tokenizer"]).resolve():
                shutil.copyfile(source / spec["tokenizer"], output.parent / renamed["tokenizer"])
        for graph in (model, prefill):
            for prop in graph.metadata_props:
                if prop.key == DECODE_KEY:
                    prop.value = json.dumps({**json.loads(prop.value), **renamed})
        graphs.append((prefill, str(prefill_path), output.with_name(renamed["prefill_model"])))
    summary: dict = {"output": str(output), "like": options.like, "gates": len(like.gates), "routers": len(like.routers)}
    for graph, name, _ in graphs:
        with progress.step(f"copying it onto {name}"):
            summary.setdefault("weight_sparsity", apply_sparsification(graph, like, name))
    # The decode step last: OUTPUT exists only once the prefill graph it names does.
    for graph, _, path in reversed(graphs):
        with progress.step(f"writing {path}"):
            save_model(graph, path)
    summary["seconds"] = time.perf_counter() - start
    return summary
