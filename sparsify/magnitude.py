"""``--weights magnitude:L``: per layer, the fraction L of entries with the smallest |W| is zeroed.

With ``--prune-output-projection`` the output projection is pruned too; where it is tied
to the embedding table (``W = E^T``, one initializer that a Gather also reads), the table
itself is pruned, so the lookup reads the same zeros.
"""

from __future__ import annotations

import numpy as np
import onnx

from compiler.progress import Progress
from sparsify.graph import Linear, get_weight, set_weight
from sparsify.methods import Method, SparsifyOptions


def magnitude_mask(weight: np.ndarray, level: float) -> np.ndarray:
    """Keeps all but the round(level * size) entries of smallest |W|."""
    mask = np.ones(weight.size, bool)
    mask[np.argsort(np.abs(weight), axis=None, kind="stable")[:round(level * weight.size)]] = False
    return mask.reshape(weight.shape)


def prune(model: onnx.ModelProto, layers: list[Linear], method: Method, options: SparsifyOptions,
          progress: Progress) -> list[Linear]:
    for layer in layers:
        weight = get_weight(model, layer)
        set_weight(model, layer, weight * magnitude_mask(weight, method.level))
    return layers
