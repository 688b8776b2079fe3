"""Statistics from running the model: what the calibrated methods measure.

The model runs in onnxruntime on the calibration corpus (``--calib``), one batch at a
time, with the tensors a method needs exposed as extra outputs. The corpus reader, the
sampler (``collect_stats``: per-channel sums over all tokens and, where asked, a bounded
random sample of token rows) and the gates' threshold fitter are
``sparsify.calibration``'s, which ``sparsecc compile`` uses too; this module gives the
methods their calibration batches from the sparsify options and measures the gates they
inserted.
"""

from __future__ import annotations

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
