"""``--weights seap:L``: whole MLP neurons removed by their mean activation (SEAP).

In every SwiGLU MLP, intermediate neurons are scored by their mean |activation| (the down
projection's input) and the lowest fraction L removed whole: their gate/up columns and
down-projection rows become zero (``drop_dead_neurons`` removes them at compile time).
``functional`` removes neurons the same way with another score (``drop_neurons``).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import onnx

from compiler.progress import Progress
from sparsify.calibration import TensorStats, collect_stats
from sparsify.graph import Linear, get_weight, require_mlps, set_weight
from sparsify.methods import Method, SparsifyOptions
from sparsify.stats import calibration


def drop_neurons(model: onnx.ModelProto, layers: list[Linear], method: Method, options: SparsifyOptions,
                 progress: Progress, score: Callable[[TensorStats], np.ndarray], rows: int = 0) -> list[Linear]:
    """Zeros, in every gated MLP, the round(L * I) neurons of lowest ``score`` (of the
    down projection input's statistics, with ``rows`` sampled token rows); returns the
    gate, up and down layers it changed."""
    blocks = require_mlps(model, layers, method.name, options.model)
    stats = collect_stats(model, [block.down.input for block in blocks], calibration(model, options, progress),
                          progress, rows, options.seed)
    touched = []
    for block in blocks:
        scores = score(stats[block.down.input])
        drop = np.argsort(scores, kind="stable")[: round(method.level * scores.size)]
        for layer, axis in ((block.gate, 1), (block.up, 1), (block.down, 0)):
            weight = get_weight(model, layer).copy()
            if axis == 1:
                weight[:, drop] = 0
            else:
                weight[drop, :] = 0
            set_weight(model, layer, weight)
            touched.append(layer)
    return touched


def prune(model: onnx.ModelProto, layers: list[Linear], method: Method, options: SparsifyOptions,
          progress: Progress) -> list[Linear]:
    return drop_neurons(model, layers, method, options, progress, lambda entry: entry.mean_abs)
