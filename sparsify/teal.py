"""``--activations teal:L``: a magnitude threshold on every linear input (TEAL).

Every input of a linear layer (not the output projection's) gets an ``ActivationGate``
that zeros values of magnitude at most its threshold. Per-tensor levels are allocated
greedily: all start at 0, and in steps of 5 % the tensor whose relative output error
``||gate(X) W - X W||^2 / ||X W||^2`` (on the sampled rows, over all layers it feeds) grows
least per weight it skips gets more sparsity, until the average weighted by the weights
each tensor feeds (the share of multiply-adds skipped) reaches L; the last step is trimmed
to land on L exactly. A tensor's threshold is the quantile of its sampled |values| at its
level (``sparsify.calibration.fit_thresholds``, the fitter ``sparsecc compile`` uses too).
"""

from __future__ import annotations

import numpy as np
import onnx

from compiler.progress import Progress
from passes.analyze_sparsity import linear_weight
from passes.base import Graph
from passes.insert_activation_gates import gated_inputs, insert_activation_gates
from sparsify.calibration import collect_stats, fit_thresholds
from sparsify.methods import Method, SparsifyOptions
from sparsify.stats import SAMPLE_ROWS, calibration

TEAL_STEP = 0.05
# Of the sampled rows, those used to estimate the output error of each level (bounds the work).
ERROR_ROWS = 128


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


def gate(model: onnx.ModelProto, method: Method, options: SparsifyOptions, progress: Progress) -> dict:
    consumers = gated_inputs(model)
    graph = Graph(model.graph)
    weights = {name: [linear_weight(node, graph)[0] for node in nodes] for name, nodes in consumers.items()}
    stats = collect_stats(model, list(consumers), calibration(model, options, progress), progress, SAMPLE_ROWS, options.seed)
    samples = {name: stats[name].sample for name in consumers}
    levels = teal_levels(samples, weights, method.level)
    thresholds, measured = fit_thresholds({name: np.abs(sample) for name, sample in samples.items()}, levels)
    insert_activation_gates(model, thresholds, measured)
    cost = {name: sum(w.size for w in weights[name]) for name in samples}
    average = sum(measured[n] * cost[n] for n in samples) / sum(cost.values())
    return {"gates": {n: {"level": levels[n], "threshold": thresholds[n], "calibrated": measured[n]} for n in samples},
            "sparsity": average}
