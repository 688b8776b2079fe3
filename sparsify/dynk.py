"""``--activations dynk:L``: dense MLPs run as dynamic-k mixtures of experts (D2DMoE).

For every gated MLP ``y = h @ W_down``, ``h = act(x @ W_gate) * (x @ W_up)`` with I
intermediate neurons, on sampled calibration rows (x and h of the same tokens):

1. **Experts.** The neurons are split into E experts of equal size (E: the divisor of I
   nearest I / 8, so 192 experts of 8 neurons for SmolLM2's I = 1536) by balanced
   spherical k-means on their co-activation profiles: neuron i is the unit vector of
   |h_i| over the sampled tokens, and experts gather neurons that are large on the same
   tokens (MoEfication clusters neurons; we cluster activations rather than weights;
   on SmolLM2 clustering the gate weights or centred profiles did no better). On
   SmolLM2 at dynk:0.5 (seed 0), experts of 4, 8, 12, 16 and 24 neurons gave perplexity
   190, 56, 406, 322 and 347 (dense 22.4), but experts of 8 with seed 1 gave 286: the
   result depends strongly on the clustering's seed and the router's split, so 8 is the
   best of that sweep, not shown best in general. In the seed-1 model the first token of
   each window (an attention sink; the calibration has one per 512 tokens) lost 75-88 %
   of two early MLPs' output against 37-38 % with seed 0, while the other tokens lost
   about as much (20-35 %) in both. Smaller experts track which neurons are large more
   finely (the error of ideal routing falls), but each router output is then harder to
   fit from the same rows, and the router grows (H x E weights).
2. **Router.** Expert e's output norm for a token is ``n_e = ||h_e W_down[e rows]||_2``.
   A linear router ``n ~ x @ R + b`` is fitted by ridge regression (numpy, seeded split)
   on 80 % of the rows; its R^2 on the other 20 % is reported. D2DMoE trains a small MLP
   router on the same target; ours is one least-squares solve.
3. **Dynamic-k.** Per token the experts with predicted norm ``s_e >= tau * max_e s_e``
   run, so the number of experts varies from token to token. Each MLP's tau is set on
   the calibration data so that the fraction of its experts not run, over all tokens, is
   the level L; then tau is re-set twice on the routed model itself (its later layers
   see the inputs the routed earlier layers produce). ``dynk:L:global`` uses one tau for
   all MLPs as the paper does; peaked layers then skip more (on SmolLM2, with experts of
   24, the first and last MLPs skipped 85-95 %), and perplexity at dynk:0.5 (experts of
   8, seed 0) was 140 against 56 with a tau per MLP. ``dynk:L:topk`` runs a fixed
   k = round((1 - L) E) experts per token.

In the graph (``passes.insert_expert_routers``) the mask multiplies the down projection's
input, and an exact gate (threshold 0) on it lets ``sparsecc compile`` skip the rows of
inactive experts in a ``GatedMatMul``. Not done: the gate and up projections still compute
every neuron (skipping their columns for inactive experts needs a gathered kernel), and
the dense model is not fine-tuned for activation sparsity first as D2DMoE does.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from compiler.progress import Progress
from passes.insert_activation_gates import probe_session
from passes.insert_expert_routers import Router, insert_expert_routers, set_tau, tensor_names
from sparsify.calibration import collect_stats
from sparsify.gates import gate_down_projections
from sparsify.graph import Mlp, get_weight, linear_layers, require_mlps
from sparsify.methods import Method, SparsifyOptions
from sparsify.stats import calibration

# Neurons per expert we aim for (the best of 4, 8, 12, 16, 24 on SmolLM2 with seed 0; see
# the module docstring for how much the seed moves that).
EXPERT_SIZE = 8
KMEANS_ITERATIONS = 20
# Ridge penalty per training row, relative to the mean variance of the router's inputs
# (of 0.01 and 0.1, 0.1 gave the better held-out R^2 on two SmolLM2 MLPs).
RIDGE = 0.1
HELD_OUT = 0.2
# Token rows sampled per MLP for clustering, router fit and tau.
ROWS = 2048
# Re-settings of tau on the routed model (each one calibration run).
TAU_REFINEMENTS = 2


@dataclass(frozen=True)
class RouterFit:
    weight: np.ndarray  # [H, E]
    bias: np.ndarray  # [E]
    r2: float  # on held-out rows


def expert_count(neurons: int) -> int:
    """The divisor of ``neurons`` nearest ``neurons / EXPERT_SIZE`` (equal-size experts)."""
    target = neurons / EXPERT_SIZE
    divisors = [d for d in range(1, neurons + 1) if neurons % d == 0]
    return min(divisors, key=lambda d: (abs(d - target), -d))


def cluster_neurons(activations: np.ndarray, experts: int, seed: int = 0) -> np.ndarray:
    """Neuron -> expert (``experts`` groups of equal size) by balanced spherical k-means
    on the unit-norm |activation| profiles of the neurons (columns of ``activations``)."""
    profiles = np.abs(activations.astype(np.float64)).T
    profiles /= np.maximum(np.linalg.norm(profiles, axis=1, keepdims=True), 1e-12)
    neurons = profiles.shape[0]
    capacity = neurons // experts
    rng = np.random.default_rng(seed)
    centres = profiles[rng.choice(neurons, experts, replace=False)]
    assignment = np.full(neurons, -1)
    for _ in range(KMEANS_ITERATIONS):
        similarity = profiles @ centres.T
        updated = np.full(neurons, -1)
        room = np.full(experts, capacity)
        # Neurons most sure of their best expert choose first; full experts are closed.
        order = np.argsort(-similarity.max(axis=1), kind="stable")
        for neuron in order:
            choice = int(np.argmax(np.where(room > 0, similarity[neuron], -np.inf)))
            updated[neuron] = choice
            room[choice] -= 1
        if np.array_equal(updated, assignment):
            break
        assignment = updated
        for expert in range(experts):
            centre = profiles[assignment == expert].sum(axis=0)
            centres[expert] = centre / max(np.linalg.norm(centre), 1e-12)
    return assignment


def expert_norms(activations: np.ndarray, down: np.ndarray, assignment: np.ndarray, experts: int) -> np.ndarray:
    """[rows, E]: ``||h_e @ W_down[e rows]||_2`` per token row and expert."""
    norms = np.empty((activations.shape[0], experts))
    for expert in range(experts):
        members = assignment == expert
        norms[:, expert] = np.linalg.norm(activations[:, members].astype(np.float64) @ down[members].astype(np.float64), axis=1)
    return norms


def ridge_solve(x: np.ndarray, y: np.ndarray, ridge: float) -> tuple[np.ndarray, np.ndarray]:
    """(W, b) minimising ``||x W + b - y||^2 + ridge ||W||^2`` (the bias is not penalised)."""
    x_mean, y_mean = x.mean(axis=0), y.mean(axis=0)
    xc, yc = x - x_mean, y - y_mean
    weight = np.linalg.solve(xc.T @ xc + ridge * np.eye(x.shape[1]), xc.T @ yc)
    return weight, y_mean - x_mean @ weight


def r_squared(predicted: np.ndarray, target: np.ndarray) -> float:
    """1 - SSE / SST over all outputs (SST about each output's mean)."""
    total = float(((target - target.mean(axis=0)) ** 2).sum())
    return 1.0 - float(((predicted - target) ** 2).sum()) / total if total > 0 else 0.0


def fit_router(hidden: np.ndarray, norms: np.ndarray, seed: int = 0) -> RouterFit:
    """Ridge regression of the expert norms on the MLP input, fitted on a seeded 80 % of
    the rows and scored (R^2) on the rest."""
    hidden, norms = hidden.astype(np.float64), norms.astype(np.float64)
    order = np.random.default_rng(seed).permutation(hidden.shape[0])
    held = max(1, round(HELD_OUT * hidden.shape[0]))
    test, train = order[:held], order[held:]
    ridge = RIDGE * len(train) * float(hidden[train].var(axis=0).mean())
    weight, bias = ridge_solve(hidden[train], norms[train], ridge)
    return RouterFit(weight, bias, r_squared(hidden[test] @ weight + bias, norms[test]))


def predicted_scores(hidden: np.ndarray, fit: RouterFit) -> np.ndarray:
    """The router's scores as the graph computes them: Relu(x R + b) in float32."""
    return np.maximum(hidden.astype(np.float32) @ fit.weight.astype(np.float32) + fit.bias.astype(np.float32), 0)


def run_mask(scores: np.ndarray, tau: float | None = None, top_k: int | None = None) -> np.ndarray:
    """Which experts run, as the graph decides: ``s >= tau * max s`` (float32), or the
    ``top_k`` largest (ties with the k-th run too)."""
    scores = scores.astype(np.float32)
    if top_k is not None:
        cutoff = -np.sort(-scores, axis=-1)[..., top_k - 1:top_k]
    else:
        cutoff = scores.max(axis=-1, keepdims=True) * np.float32(tau)
    return scores >= cutoff


def calibrate_tau(scores: list[np.ndarray], level: float) -> float:
    """The tau whose rule ``s >= tau * max s`` skips the fraction ``level`` of all the
    experts of all token rows in ``scores`` (one [rows, E] array per MLP)."""
    ratios = []
    for value in scores:
        top = value.max(axis=-1, keepdims=True).astype(np.float64)
        ratios.append(np.where(top > 0, value / np.where(top > 0, top, 1), 1.0).ravel())
    ratios = np.sort(np.concatenate(ratios))
    skipped = min(round(level * ratios.size), ratios.size - 1)
    if skipped == 0:
        return 0.0
    # Halfway to the next smaller ratio keeps float32 rounding from moving the boundary.
    return float((ratios[skipped] + ratios[skipped - 1]) / 2)


def calibrate_taus(scores: dict[str, np.ndarray], level: float, shared: bool) -> dict[str, float]:
    """Per MLP (key), the tau skipping ``level`` of its experts, or with ``shared`` one tau
    skipping ``level`` of all the experts of all MLPs together."""
    if shared:
        return dict.fromkeys(scores, calibrate_tau(list(scores.values()), level))
    return {name: calibrate_tau([value], level) for name, value in scores.items()}


def top_k_for(level: float, experts: int) -> int:
    """Experts run per token for top-k at level L: round((1 - L) E), at least one."""
    return max(1, round((1 - level) * experts))


def route_experts(model: onnx.ModelProto, blocks: list[Mlp], method: Method, options: SparsifyOptions,
                  progress: Progress) -> dict[str, dict]:
    """Experts, routers and tau for every MLP (steps 1-3 above); inserts the routers and
    returns per MLP its experts, rule, router R^2 and skipped fraction."""
    feeds = calibration(model, options, progress)
    hidden_of = {block.down.input: block.gate.input for block in blocks}
    stats = collect_stats(model, [*hidden_of.values(), *hidden_of], feeds, progress, ROWS, options.seed, paired=True)
    fits, scores = {}, {}
    for block in blocks:
        neurons = stats[block.down.input].sample
        experts = expert_count(neurons.shape[1])
        assignment = cluster_neurons(neurons, experts, options.seed)
        norms = expert_norms(neurons, get_weight(model, block.down), assignment, experts)
        fits[block.down.input] = (fit_router(stats[block.gate.input].sample, norms, options.seed), assignment)
        scores[block.down.input] = predicted_scores(stats[block.gate.input].sample, fits[block.down.input][0])
        progress(f"dynk: {block.down.input}: {experts} experts, router R^2 {fits[block.down.input][0].r2:.3f}")
    top_k = method.option == "topk"
    taus = {} if top_k else calibrate_taus(scores, method.level, method.option == "global")
    routers = [Router(hidden_of[neurons], neurons, fit.weight, fit.bias, assignment, taus.get(neurons),
                      top_k_for(method.level, fit.weight.shape[1]) if top_k else None)
               for neurons, (fit, assignment) in fits.items()]
    insert_expert_routers(model, routers)
    # The routed model's later MLPs see the inputs its routed earlier MLPs make: tau is
    # re-set on the routed model itself, then the skipped fractions are measured on it.
    refinements = 0 if top_k else TAU_REFINEMENTS
    for refinement in range(refinements + 1):
        routed_scores, skipped = routing_on(model, list(fits), feeds)
        if refinement == refinements:
            break
        taus = calibrate_taus(routed_scores, method.level, method.option == "global")
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


def gate(model: onnx.ModelProto, method: Method, options: SparsifyOptions, progress: Progress) -> dict:
    blocks = require_mlps(model, linear_layers(model), method.name, options.model)
    gates = route_experts(model, blocks, method, options, progress)
    # The routers make each down projection read the routed tensor: that is what is gated.
    return gate_down_projections(model, [tensor_names(block.down.input)["routed"] for block in blocks], gates)
