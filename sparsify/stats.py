"""Statistics from running the model: what the calibrated methods measure.

The model runs in onnxruntime on the calibration corpus (``--calib``, read by
``sparsify.calibration``), one batch at a time, with the tensors a method needs exposed as
extra outputs (``probe_session``). Per tensor it keeps per-channel sums over all tokens
and, where asked, a bounded random sample of token rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx

from compiler.build import input_signature
from compiler.progress import Progress
from passes.insert_activation_gates import probe_session
from runtime.errors import SparseccError
from sparsify.calibration import calibration_feeds
from sparsify.methods import SparsifyOptions

# Token rows kept per tensor for the methods that need rows (FastICA, TEAL, CATS).
SAMPLE_ROWS = 512


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
    """The calibration batches of ``options.calib`` for ``model`` (its inputs' own shapes)."""
    if not options.calib:
        raise SparseccError("this method needs calibration data: give --calib pydoc, a text file or an .npz of inputs.")
    shapes = {spec.name: list(spec.shape) for spec in input_signature(model, {})}
    feeds = calibration_feeds(model, options.calib, shapes, options.calib_tokens)
    progress(f"calibrating on {len(feeds)} batches of {options.calib}")
    return feeds


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
