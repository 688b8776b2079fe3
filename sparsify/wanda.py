"""``--weights wanda:L`` and ``wanda:N:M`` (Wanda: pruning by weights and activations).

Score ``|W_ij| * ||X_i||_2`` for ``W [K, N]`` (``X_i``: input channel i over all
calibration tokens); in every output column j the fraction L of lowest scores is zeroed.
``wanda:N:M``: in every output column, of every M consecutive inputs the N of highest
score are kept (sparsity (M - N) / M). With ``--prune-output-projection`` the output
projection is scored by the norms of the final hidden states.
"""

from __future__ import annotations

import numpy as np
import onnx

from compiler.progress import Progress
from runtime.errors import SparseccError
from sparsify.calibration import collect_stats
from sparsify.graph import Linear, get_weight, set_weight
from sparsify.methods import Method, SparsifyOptions
from sparsify.stats import calibration


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


def prune(model: onnx.ModelProto, layers: list[Linear], method: Method, options: SparsifyOptions,
          progress: Progress) -> list[Linear]:
    stats = collect_stats(model, [layer.input for layer in layers], calibration(model, options, progress), progress)
    for layer in layers:
        weight = get_weight(model, layer)
        set_weight(model, layer, weight * wanda_mask(wanda_scores(weight, stats[layer.input].norms), method.level, method.n, method.m))
    return layers
