"""``sparsecc sparsify``: prune weights and gate activations of an ONNX model.

Everything works on the ONNX graph. Statistics come from running the model in
onnxruntime on a calibration corpus, with the linear layers' inputs exposed as extra
outputs, one batch at a time (per-channel sums and a bounded row sample per tensor).

Weight methods (``--weights METHOD:LEVEL``), on every linear layer with a constant 2-D
weight except the output projection (whose result is a model output), y = x @ W, W [K, N];
``--prune-output-projection`` adds the output projection to ``magnitude`` and ``wanda``
(Wanda's input norms are then those of the final hidden states). Where the projection is
tied to the embedding table (``W = E^T``, one initializer that a Gather also reads), the
table itself is pruned, so the lookup reads the same zeros:

* ``magnitude:L``: per layer, the fraction L of entries with the smallest |W| is zeroed.
* ``wanda:L``: score |W_ij| * ||X_i||_2 (X_i: input channel i over all calibration
  tokens); in every output column j the fraction L of lowest scores is zeroed (Wanda).
* ``wanda:N:M``: in every output column, of every M consecutive inputs the N of highest
  score are kept (sparsity (M - N) / M).
* ``seap:L``: in every SwiGLU MLP, intermediate neurons are scored by their mean
  |activation| (the down projection's input) and the lowest fraction L removed whole:
  their gate/up columns and down-projection rows become zero (``drop_dead_neurons``
  removes them at compile time).
* ``functional:L``: as ``seap`` but neurons are scored by FastICA on sampled rows of the
  down projection's input (32 components, seeded): a neuron's score is its largest
  loading on a unit-norm independent component, so neurons outside every functional
  network go first.
* ``--mask FILE``: external masks (``compiler/mask_files.py``): a ``torch.nn.utils.prune``
  state dict (``.pt``) or a compressed-tensors ``sparse-bitmask`` checkpoint
  (``.safetensors``); the masks, in module order, are matched to the linear layers in graph
  order by shape ([N, K] transposed).
* ``--like SPARSIFIED``: the weights, ReLUs, gates and dynk expert routers of another export
  of the same model, copied (``compiler/sparsify_like.py``), e.g. from the seq-512 graph onto
  a ``--decode`` export.

Activation methods (``--activations METHOD:LEVEL``), written as ``ai.sparsecc``
``ActivationGate`` nodes that onnxruntime runs and ``sparsecc compile`` fuses:

* ``teal:L``: a magnitude threshold on every linear input (not the output projection's).
  Per-tensor levels are allocated greedily: all start at 0, and in steps of 5 % the tensor
  whose relative output error ||gate(X) W - X W||^2 / ||X W||^2 (on the sampled rows,
  over all layers it feeds) grows least per weight it skips gets more sparsity, until the
  average weighted by the weights each tensor feeds (the share of multiply-adds skipped)
  reaches L; the last step is trimmed to land on L exactly.
* ``cats:L``: a threshold gate on the SiLU output of every MLP (the quantile of its
  |values| at L) plus an exact (threshold 0) gate on the down projection's input so the
  compiled down projection skips the zeros.
* ``relu``: SiLU becomes ReLU (natural zeros), with the same exact gate on the down input.
* ``dynk:L`` (D2DMoE, ``compiler/dynk.py``): every MLP's neurons are clustered into experts
  and a linear router fitted on the calibration rows predicts each expert's output norm;
  per token the experts with predicted norm >= tau * the largest run, tau set per MLP so
  that it skips the fraction L of its experts on the calibration data (``dynk:L:global``:
  one tau for all MLPs, as in the paper; ``dynk:L:topk``: the round((1 - L) E) best
  experts run). The mask multiplies the down projection's input, which gets the same
  exact gate; gate/up still compute every neuron.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import onnx
from onnx import helper, numpy_helper

from compiler import dynk
from compiler.mask_files import read_masks
from compiler.progress import SILENT, Progress
from passes import sparse_ops
from passes.base import Graph, attribute, gemm_refusal, remove_unused_initializers
from passes.insert_activation_gates import gated_inputs, insert_activation_gates, probe_session
from passes.insert_expert_routers import Router, find_expert_routers, insert_expert_routers, set_tau, tensor_names
from runtime.errors import SparseccError

WEIGHT_METHODS = ("magnitude", "wanda", "seap", "functional")
ACTIVATION_METHODS = ("teal", "cats", "relu", "dynk")
# dynk's expert selection: a tau per MLP (the default, no option), one tau for all MLPs
# (the paper's single tau), or a fixed top-k.
DYNK_OPTIONS = ("global", "topk")
# Independent components per MLP for the 'functional' method, and FastICA's limits.
ICA_COMPONENTS = 32
ICA_ITERATIONS = 200
ICA_TOLERANCE = 1e-4
# Token rows kept per tensor for TEAL's error estimates and thresholds.
SAMPLE_ROWS = 512
TEAL_STEP = 0.05
# Of those, rows used to estimate the output error of each level (bounds the work).
ERROR_ROWS = 128


@dataclass(frozen=True)
class Method:
    """A parsed ``METHOD:LEVEL`` (or ``wanda:N:M``) specification."""

    name: str
    level: float = 0.0
    n: int | None = None
    m: int | None = None
    option: str | None = None


def parse_method(text: str, kind: str) -> Method:
    """Parses ``--weights`` (kind "weights") or ``--activations`` (kind "activations")."""
    known = WEIGHT_METHODS if kind == "weights" else ACTIVATION_METHODS
    name, _, rest = text.partition(":")
    option = None
    if name not in known:
        raise SparseccError(f"--{kind} {text!r}: unknown method {name!r} (choose from {', '.join(known)}).")
    if name == "relu":
        if rest:
            raise SparseccError(f"--activations relu takes no level (its sparsity is the ReLU's natural zeros), not {text!r}.")
        return Method(name)
    if name == "wanda" and rest.count(":") == 1:
        n_text, m_text = rest.split(":")
        if not (n_text.isdigit() and m_text.isdigit()):
            raise SparseccError(f"--weights {text!r}: N:M must be two whole numbers, e.g. wanda:2:4.")
        n, m = int(n_text), int(m_text)
        if not 0 < n < m:
            raise SparseccError(f"--weights {text!r}: N:M needs 0 < N < M (keep N of every M), e.g. wanda:2:4.")
        return Method(name, (m - n) / m, n, m)
    if name == "dynk" and ":" in rest:
        rest, _, option = rest.partition(":")
        if option not in DYNK_OPTIONS:
            raise SparseccError(f"--activations {text!r}: unknown option {option!r}; write dynk:L (a tau per MLP), "
                                "dynk:L:global (one tau for all MLPs) or dynk:L:topk (a fixed number of experts per token).")
    try:
        level = float(rest)
    except ValueError:
        raise SparseccError(f"--{kind} {text!r} needs a level: {name}:LEVEL with LEVEL between 0 and 1, e.g. {name}:0.5.") from None
    if not 0.0 <= level < 1.0:
        raise SparseccError(f"--{kind} {text!r}: the level must be in [0, 1), not {level:g}.")
    return Method(name, level, option=option)


@dataclass(frozen=True)
class SparsifyOptions:
    """What ``sparsecc sparsify`` does (see the module docstring for the methods)."""

    model: str
    output: str
    weights: str | None = None
    activations: str | None = None
    calib: str | None = None
    calib_tokens: int = 2048
    seed: int = 0
    mask: str | None = None
    like: str | None = None
    prune_output_projection: bool = False


# --- the graph: linear layers and SwiGLU MLPs ---------------------------------------


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


# --- calibration statistics ---------------------------------------------------------


@dataclass
class TensorStats:
    """Per-channel sums over all calibration tokens and a bounded sample of token rows."""

    sumsq: np.ndarray
    sumabs: np.ndarray
    count: int = 0
    rows: list = field(default_factory=list)

    @property
    def norms(self) -> np.ndarray:
        return np.sqrt(self.sumsq)

    @property
    def mean_abs(self) -> np.ndarray:
        return self.sumabs / max(self.count, 1)

    @property
    def sample(self) -> np.ndarray:
        return np.concatenate(self.rows).astype(np.float32)


def collect_stats(model: onnx.ModelProto, tensors: list[str], feeds: list[dict], progress: Progress,
                  rows: int = 0, seed: int = 0, paired: bool = False) -> dict[str, TensorStats]:
    """Runs ``model`` on ``feeds`` batch by batch, accumulating per-channel statistics of
    ``tensors`` (last axis = channel) and keeping up to ``rows`` random token rows each;
    ``paired``: the same token rows for every tensor (they must have the same rows)."""
    tensors = sorted(set(tensors))
    session = probe_session(model, tensors)
    rng = np.random.default_rng(seed)
    stats: dict[str, TensorStats] = {}
    per_batch = -(-rows // max(1, len(feeds))) if rows else 0
    for index, feed in enumerate(feeds, start=1):
        take = None
        for name, value in zip(tensors, session.run(tensors, feed)):
            flat = value.reshape(-1, value.shape[-1]).astype(np.float64)
            entry = stats.setdefault(name, TensorStats(np.zeros(flat.shape[1]), np.zeros(flat.shape[1])))
            entry.sumsq += (flat * flat).sum(axis=0)
            entry.sumabs += np.abs(flat).sum(axis=0)
            entry.count += flat.shape[0]
            if per_batch:
                if take is None or not paired:
                    take = np.sort(rng.choice(flat.shape[0], min(per_batch, flat.shape[0]), replace=False))
                entry.rows.append(flat[take].astype(np.float32))
        if index % max(1, len(feeds) // 10) == 0 or index == len(feeds):
            progress(f"calibration batch {index}/{len(feeds)}: {len(tensors)} tensors")
    return stats


def calibration(model: onnx.ModelProto, options: SparsifyOptions, progress: Progress) -> list[dict]:
    from sparsify.calibration import calibration_feeds
    from compiler.driver import input_signature

    if not options.calib:
        raise SparseccError("this method needs calibration data: give --calib pydoc, a text file or an .npz of inputs.")
    shapes = {spec.name: list(spec.shape) for spec in input_signature(model, {})}
    feeds = calibration_feeds(model, options.calib, shapes, options.calib_tokens)
    progress(f"calibrating on {len(feeds)} batches of {options.calib}")
    return feeds


# --- weight methods -----------------------------------------------------------------


def magnitude_mask(weight: np.ndarray, level: float) -> np.ndarray:
    """Keeps all but the round(level * size) entries of smallest |W|."""
    mask = np.ones(weight.size, bool)
    mask[np.argsort(np.abs(weight), axis=None, kind="stable")[:round(level * weight.size)]] = False
    return mask.reshape(weight.shape)


def wanda_scores(weight: np.ndarray, norms: np.ndarray) -> np.ndarray:
    """|W_ij| * ||X_i||_2 for W [K, N] (i: input channel, j: output neuron)."""
    return np.abs(weight) * norms[:, None]


def wanda_mask(scores: np.ndarray, level: float, n: int | None = None, m: int | None = None) -> np.ndarray:
    """Per output column j: zero the round(level * K) lowest scores, or with N:M keep the N
    highest of every M consecutive inputs."""
    k, cols = scores.shape
    mask = np.ones_like(scores, bool)
    if n is not None:
        if k % m:
            raise SparseccError(f"wanda:{n}:{m} needs the input size to be a multiple of {m}; a layer has {k}.")
        groups = scores.reshape(k // m, m, cols)
        drop = np.argsort(groups, axis=1, kind="stable")[:, : m - n, :]
        group_mask = np.ones_like(groups, bool)
        np.put_along_axis(group_mask, drop, False, axis=1)
        return group_mask.reshape(k, cols)
    drop = np.argsort(scores, axis=0, kind="stable")[: round(level * k)]
    np.put_along_axis(mask, drop, False, axis=0)
    return mask


def _decorrelate(w: np.ndarray) -> np.ndarray:
    """(W W^T)^(-1/2) W: the symmetric orthogonalisation of FastICA."""
    values, vectors = np.linalg.eigh(w @ w.T)
    return (vectors / np.sqrt(np.maximum(values, 1e-12))) @ vectors.T @ w


def fast_ica(x: np.ndarray, components: int, seed: int = 0) -> np.ndarray:
    """Mixing matrix [features, components] of x [samples, features] by parallel FastICA
    (log-cosh contrast, tanh nonlinearity) after PCA whitening; deterministic for a seed."""
    x = x - x.mean(axis=0)
    samples = x.shape[0]
    _, singular, vt = np.linalg.svd(x, full_matrices=False)
    components = min(components, int((singular > singular[0] * 1e-6).sum()))
    whitening = vt[:components] / singular[:components, None] * np.sqrt(samples)
    z = x @ whitening.T
    w = _decorrelate(np.random.default_rng(seed).standard_normal((components, components)))
    for _ in range(ICA_ITERATIONS):
        g = np.tanh(z @ w.T)
        updated = _decorrelate(g.T @ z / samples - (1 - g * g).mean(axis=0)[:, None] * w)
        converged = np.max(np.abs(np.abs(np.sum(updated * w, axis=1)) - 1)) < ICA_TOLERANCE
        w = updated
        if converged:
            break
    return np.linalg.pinv(w @ whitening)


def ica_scores(rows: np.ndarray, seed: int = 0) -> np.ndarray:
    """Per neuron (column of ``rows``): its largest loading on an independent component
    (each component's loadings scaled to unit norm): neurons that belong strongly to some
    functional network score high, those in none score low."""
    mixing = fast_ica(rows.astype(np.float64), ICA_COMPONENTS, seed)
    mixing = mixing / np.maximum(np.linalg.norm(mixing, axis=0, keepdims=True), 1e-12)
    return np.abs(mixing).max(axis=1)


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


def apply_masks(model: onnx.ModelProto, layers: list[Linear], path: str) -> list[str]:
    """Multiplies the weights by the masks in ``path``, matched in order by shape."""
    masks = read_masks(path)
    # torch Linear weights are [N, K]
    matched = match_by_shape(model, layers, [mask.T.shape for mask in masks],
                             lambda i: f"{path}: a mask of shape {list(masks[i].shape)} matches no remaining linear layer "
                                       f"of shape {list(masks[i].T.shape)} (transposed).")
    for mask, layer in zip(masks, matched):
        set_weight(model, layer, get_weight(model, layer) * mask.T)
    return [layer.weight for layer in matched]


def prune_weights(model: onnx.ModelProto, method: Method, options: SparsifyOptions, progress: Progress) -> dict:
    layers = linear_layers(model)
    if not layers:
        raise SparseccError(f"{options.model} has no linear layers with constant weights to prune.")
    if options.prune_output_projection:
        layers.append(output_projection(model))
    touched = layers
    if method.name == "magnitude":
        for layer in layers:
            weight = get_weight(model, layer)
            set_weight(model, layer, weight * magnitude_mask(weight, method.level))
    elif method.name == "wanda":
        stats = collect_stats(model, [layer.input for layer in layers], calibration(model, options, progress), progress)
        for layer in layers:
            weight = get_weight(model, layer)
            set_weight(model, layer, weight * wanda_mask(wanda_scores(weight, stats[layer.input].norms), method.level, method.n, method.m))
    elif method.name in ("seap", "functional"):
        blocks = mlp_blocks(model, layers)
        if not blocks:
            raise SparseccError(f"{method.name} needs gated MLPs (down(act(gate x) * up x)); {options.model} has none.")
        rows = SAMPLE_ROWS if method.name == "functional" else 0
        stats = collect_stats(model, [block.down.input for block in blocks], calibration(model, options, progress),
                              progress, rows, options.seed)
        touched = []
        for block in blocks:
            entry = stats[block.down.input]
            scores = entry.mean_abs if method.name == "seap" else ica_scores(entry.sample, options.seed)
            drop = np.argsort(scores, kind="stable")[: round(method.level * scores.size)]
            for layer, axis in ((block.gate, 1), (block.up, 1), (block.down, 0)):
                weight = get_weight(model, layer).copy()
                if axis == 1:
                    weight[:, drop] = 0
                else:
                    weight[drop, :] = 0
                set_weight(model, layer, weight)
                touched.append(layer)
    return weight_sparsity(model, touched)


def weight_sparsity(model: onnx.ModelProto, layers: list[Linear]) -> dict:
    """Fraction of zeros over ``layers`` and per layer."""
    per_layer, zeros, total = {}, 0, 0
    for layer in layers:
        weight = get_weight(model, layer)
        per_layer[layer.weight] = float(1 - np.count_nonzero(weight) / weight.size)
        zeros += weight.size - np.count_nonzero(weight)
        total += weight.size
    return {"layers": per_layer, "sparsity": zeros / total if total else 0.0}


# --- activation methods -------------------------------------------------------------


def teal_levels(samples: dict[str, np.ndarray], weights: dict[str, list[np.ndarray]], level: float) -> dict[str, float]:
    """Greedy per-tensor levels whose weighted average is ``level`` (module docstring)."""
    grid = np.round(np.arange(0.0, 1.0, TEAL_STEP), 6)
    cost = {name: sum(w.size for w in weights[name]) for name in samples}
    total = sum(cost.values())
    errors = {}
    for name, rows in samples.items():
        rows = rows[:ERROR_ROWS]
        dense = [rows @ w for w in weights[name]]
        norm = sum(float((d * d).sum()) for d in dense) or 1.0
        magnitudes = np.abs(rows)
        curve = []
        for g in grid:
            threshold = np.quantile(magnitudes, g) if g > 0 else -1.0
            dropped = np.where(magnitudes <= threshold, rows, 0)
            curve.append(sum(float(((dropped @ w) ** 2).sum()) for w in weights[name]) / norm)
        errors[name] = curve
    index = {name: 0 for name in samples}
    average = 0.0
    last = None
    while average < level - 1e-12:
        candidates = [(name, (errors[name][index[name] + 1] - errors[name][index[name]]) / cost[name])
                      for name in samples if index[name] + 1 < len(grid)]
        if not candidates:
            break
        last = min(candidates, key=lambda item: (item[1], item[0]))[0]
        index[last] += 1
        average += TEAL_STEP * cost[last] / total
    levels = {name: float(grid[index[name]]) for name in samples}
    if last is not None and average > level:  # trim the last step to land on the target
        levels[last] -= (average - level) * total / cost[last]
    return levels


def _gate_tensor(model: onnx.ModelProto, tensor: str, threshold: float) -> None:
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


def _silu_to_relu(model: onnx.ModelProto, blocks: list[Mlp]) -> None:
    """Replaces the SiLU (Sigmoid, Mul) of every block by a Relu, in one rewrite."""
    drop = {id(block.silu[0]) for block in blocks if block.silu}
    relus = {id(block.silu[1]): helper.make_node("Relu", [block.silu[0].input[0]], [block.act],
                                                 name=(block.silu[1].name or block.act) + "_relu")
             for block in blocks if block.silu}
    nodes = [relus.get(id(node), node) for node in model.graph.node if id(node) not in drop]
    del model.graph.node[:]
    model.graph.node.extend(nodes)


def gate_activations(model: onnx.ModelProto, method: Method, options: SparsifyOptions, progress: Progress) -> dict:
    layers = linear_layers(model)
    if method.name == "teal":
        consumers = gated_inputs(model)
        graph = Graph(model.graph)
        from passes.analyze_sparsity import linear_weight

        weights = {name: [linear_weight(node, graph)[0] for node in nodes] for name, nodes in consumers.items()}
        stats = collect_stats(model, list(consumers), calibration(model, options, progress), progress, SAMPLE_ROWS, options.seed)
        samples = {name: stats[name].sample for name in consumers}
        levels = teal_levels(samples, weights, method.level)
        thresholds = {name: float(np.quantile(np.abs(samples[name]), lv)) if lv > 0 else 0.0 for name, lv in levels.items()}
        measured = {name: float((np.abs(samples[name]) <= thresholds[name]).mean()) if levels[name] > 0 else
                    float((samples[name] == 0).mean()) for name in samples}
        insert_activation_gates(model, thresholds, measured)
        cost = {name: sum(w.size for w in weights[name]) for name in samples}
        average = sum(measured[n] * cost[n] for n in samples) / sum(cost.values())
        return {"gates": {n: {"level": levels[n], "threshold": thresholds[n], "calibrated": measured[n]} for n in samples},
                "sparsity": average}
    blocks = mlp_blocks(model, layers)
    if not blocks:
        raise SparseccError(f"{method.name} needs gated MLPs (down(act(gate x) * up x)); {options.model} has none.")
    gates = {}
    if method.name == "cats":
        silu_blocks = [block for block in blocks if block.silu is not None]
        if not silu_blocks:
            raise SparseccError(f"cats needs SiLU MLPs; the MLPs of {options.model} use another activation.")
        stats = collect_stats(model, [block.act for block in silu_blocks], calibration(model, options, progress),
                              progress, SAMPLE_ROWS, options.seed)
        for block in silu_blocks:
            magnitudes = np.abs(stats[block.act].sample)
            threshold = float(np.quantile(magnitudes, method.level)) if method.level > 0 else 0.0
            _gate_tensor(model, block.act, threshold)
            gates[block.act] = {"threshold": threshold, "calibrated": float((magnitudes <= threshold).mean())}
    elif method.name == "dynk":
        gates = route_experts(model, blocks, method, options, progress)
    else:  # relu
        _silu_to_relu(model, blocks)
        gates = {block.act: {"threshold": None} for block in blocks}
    remove_unused_initializers(model.graph)
    # An exact gate (threshold 0) on the down projection's input lets the compiled kernel
    # skip the zeros made upstream.
    down_inputs = [tensor_names(b.down.input)["routed"] if method.name == "dynk" else b.down.input for b in blocks]
    insert_activation_gates(model, dict.fromkeys(down_inputs, 0.0))
    sparse_ops.attach_reference_functions(model)
    calibrated = [g["calibrated"] for g in gates.values() if "calibrated" in g]
    return {"gates": gates, "sparsity": float(np.mean(calibrated)) if calibrated else None}


def route_experts(model: onnx.ModelProto, blocks: list[Mlp], method: Method, options: SparsifyOptions,
                  progress: Progress) -> dict[str, dict]:
    """dynk: experts, routers and tau for every MLP (``compiler/dynk.py``); inserts the
    routers and returns per MLP its experts, rule, router R^2 and skipped fraction."""
    feeds = calibration(model, options, progress)
    hidden_of = {block.down.input: block.gate.input for block in blocks}
    stats = collect_stats(model, [*hidden_of.values(), *hidden_of], feeds, progress, dynk.ROWS, options.seed, paired=True)
    fits, scores = {}, {}
    for block in blocks:
        neurons = stats[block.down.input].sample
        experts = dynk.expert_count(neurons.shape[1])
        assignment = dynk.cluster_neurons(neurons, experts, options.seed)
        norms = dynk.expert_norms(neurons, get_weight(model, block.down), assignment, experts)
        fits[block.down.input] = (dynk.fit_router(stats[block.gate.input].sample, norms, options.seed), assignment)
        scores[block.down.input] = dynk.predicted_scores(stats[block.gate.input].sample, fits[block.down.input][0])
        progress(f"dynk: {block.down.input}: {experts} experts, router R^2 {fits[block.down.input][0].r2:.3f}")
    top_k = method.option == "topk"
    taus = {} if top_k else dynk.calibrate_taus(scores, method.level, method.option == "global")
    routers = [Router(hidden_of[neurons], neurons, fit.weight, fit.bias, assignment, taus.get(neurons),
                      dynk.top_k_for(method.level, fit.weight.shape[1]) if top_k else None)
               for neurons, (fit, assignment) in fits.items()]
    insert_expert_routers(model, routers)
    # The routed model's later MLPs see the inputs its routed earlier MLPs make: tau is
    # re-set on the routed model itself, then the skipped fractions are measured on it.
    refinements = 0 if top_k else dynk.TAU_REFINEMENTS
    for refinement in range(refinements + 1):
        routed_scores, skipped = routing_on(model, list(fits), feeds)
        if refinement == refinements:
            break
        taus = dynk.calibrate_taus(routed_scores, method.level, method.option == "global")
        for neurons, tau in taus.items():
            set_tau(model, neurons, tau)
    return {router.neurons: {"experts": int(router.weight.shape[1]), "tau": taus.get(router.neurons), "top_k": router.top_k,
                             "router_r2": fits[router.neurons][0].r2, "calibrated": skipped[router.neurons]}
            for router in routers}


def routing_on(model: onnx.ModelProto, down_inputs: list[str], feeds: list[dict]) -> tuple[dict, dict]:
    """Runs a model with expert routers on ``feeds``: per MLP (named by its down input),
    the router scores of all tokens [tokens, E] and the fraction of experts skipped."""
    names = [tensor_names(neurons)[key] for neurons in down_inputs for key in ("scores", "mask")]
    probe = probe_session(model, names)
    scores = {neurons: [] for neurons in down_inputs}
    skipped = dict.fromkeys(down_inputs, 0.0)
    for feed in feeds:
        values = probe.run(names, feed)
        for neurons, score, mask in zip(down_inputs, values[0::2], values[1::2]):
            scores[neurons].append(score.reshape(-1, score.shape[-1]))
            skipped[neurons] += float(1 - mask.mean()) / len(feeds)
    return {neurons: np.concatenate(value) for neurons, value in scores.items()}, skipped


def measure_gate_sparsity(model: onnx.ModelProto, feeds: list[dict]) -> dict[str, float]:
    """Fraction of exact zeros at every ActivationGate output, running ``model`` on ``feeds``."""
    outputs = [node.output[0] for node in model.graph.node if node.op_type == "ActivationGate"]
    if not outputs:
        return {}
    session = probe_session(model, outputs)
    zeros = dict.fromkeys(outputs, 0)
    sizes = dict.fromkeys(outputs, 0)
    for feed in feeds:
        for name, value in zip(outputs, session.run(outputs, feed)):
            zeros[name] += int(value.size - np.count_nonzero(value))
            sizes[name] += int(value.size)
    return {name: zeros[name] / sizes[name] for name in outputs}


# --- the verb -----------------------------------------------------------------------


def sparsify(options: SparsifyOptions, progress: Progress = SILENT) -> dict:
    """Applies the weight and activation methods; writes ``options.output``; returns a summary."""
    from compiler.onnx_io import load_model, save_model

    if options.prune_output_projection and (options.like or options.weights is None
                                            or options.weights.partition(":")[0] not in ("magnitude", "wanda")):
        raise SparseccError("--prune-output-projection prunes with --weights magnitude:L or wanda:L; give one of them "
                            "(seap and functional remove MLP neurons, which the output projection does not have).")
    if options.like:
        from compiler.sparsify_like import sparsify_like

        return sparsify_like(options, progress)
    weights = parse_method(options.weights, "weights") if options.weights else None
    activations = parse_method(options.activations, "activations") if options.activations else None
    if weights is None and activations is None and not options.mask:
        raise SparseccError("nothing to do: give --weights METHOD:LEVEL, --activations METHOD:LEVEL or --mask FILE.")
    if weights is not None and options.mask:
        raise SparseccError("give either --weights or --mask, not both.")
    if options.calib_tokens < 1:
        raise SparseccError(f"--calib-tokens must be positive, not {options.calib_tokens}.")
    start = time.perf_counter()
    with progress.step(f"loading {options.model}"):
        model = load_model(options.model)
    summary: dict = {"output": str(options.output), "weights": options.weights, "activations": options.activations}
    if options.mask:
        with progress.step(f"applying the masks of {options.mask}"):
            layers = linear_layers(model)
            masked = set(apply_masks(model, layers, options.mask))
            summary["weight_sparsity"] = weight_sparsity(model, [layer for layer in layers if layer.weight in masked])
    if weights is not None:
        with progress.step(f"pruning weights: {options.weights}"):
            summary["weight_sparsity"] = prune_weights(model, weights, options, progress)
    if activations is not None:
        with progress.step(f"gating activations: {options.activations}"):
            summary["activation_sparsity"] = gate_activations(model, activations, options, progress)
        if options.calib:
            with progress.step("measuring the gates' sparsity on the calibration data"):
                summary["activation_sparsity"]["measured"] = measure_gate_sparsity(model, calibration(model, options, progress))
    with progress.step(f"writing {options.output}"):
        save_model(model, options.output)
    summary["seconds"] = time.perf_counter() - start
    return summary
