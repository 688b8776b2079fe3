"""``--activations cats:L``: a threshold on the SiLU output of every MLP (CATS).

The threshold is the quantile of the SiLU output's sampled |values| at L
(``sparsify.calibration.fit_thresholds``); an exact gate
(threshold 0) on the down projection's input lets the compiled down projection skip the
zeros.
"""

from __future__ import annotations

import numpy as np
import onnx

from compiler.progress import Progress
from runtime.errors import SparseccError
from sparsify.calibration import collect_stats, fit_thresholds
from sparsify.gates import gate_down_projections, gate_tensor
from sparsify.graph import linear_layers, require_mlps
from sparsify.methods import Method, SparsifyOptions
from sparsify.stats import SAMPLE_ROWS, calibration


def gate(model: onnx.ModelProto, method: Method, options: SparsifyOptions, progress: Progress) -> dict:
    blocks = require_mlps(model, linear_layers(model), method.name, options.model)
    silu_blocks = [block for block in blocks if block.silu is not None]
    if not silu_blocks:
        raise SparseccError(f"cats needs SiLU MLPs; the MLPs of {options.model} use another activation.")
    stats = collect_stats(model, [block.act for block in silu_blocks], calibration(model, options, progress),
                          progress, SAMPLE_ROWS, options.seed)
    acts = [block.act for block in silu_blocks]
    thresholds, measured = fit_thresholds({act: np.abs(stats[act].sample) for act in acts}, dict.fromkeys(acts, method.level))
    gates = {}
    for act in acts:
        gate_tensor(model, act, thresholds[act])
        gates[act] = {"threshold": thresholds[act], "calibrated": measured[act]}
    return gate_down_projections(model, [block.down.input for block in blocks], gates)
