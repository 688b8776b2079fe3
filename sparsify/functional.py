"""``--weights functional:L``: whole MLP neurons removed by FastICA scores.

As ``seap``, but neurons are scored by FastICA on sampled rows of the down projection's
input (32 components, seeded): a neuron's score is its largest loading on a unit-norm
independent component, so neurons outside every functional network go first.
"""

from __future__ import annotations

import numpy as np
import onnx

from compiler.progress import Progress
from sparsify.graph import Linear
from sparsify.methods import Method, SparsifyOptions
from sparsify.seap import drop_neurons
from sparsify.stats import SAMPLE_ROWS

# Independent components per MLP, and FastICA's limits.
ICA_COMPONENTS = 32
ICA_ITERATIONS = 200
ICA_TOLERANCE = 1e-4


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


def prune(model: onnx.ModelProto, layers: list[Linear], method: Method, options: SparsifyOptions,
          progress: Progress) -> list[Linear]:
    return drop_neurons(model, layers, method, options, progress, lambda entry: ica_scores(entry.sample, options.seed),
                        SAMPLE_ROWS)
