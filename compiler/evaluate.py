"""``sparsecc eval``: perplexity of an ONNX model or a compiled artifact on a text corpus.

The corpus is tokenized as for calibration (``sparsify.calibration``: the model's own
tokenizer when its ONNX file names its source, else bytes) and cut into non-overlapping
windows of the model's input shape [batch, seq_len]. In each window every token after the
first is predicted from the logits at the position before it; the perplexity is
exp(mean negative log-likelihood) over all predicted tokens. With ``scored="second-half"``
only the targets at positions seq_len/2+1 .. seq_len-1 count, each predicted from at least
half a window of context: llama.cpp's ``llama-perplexity`` convention, so its figure for a
GGUF of the same model on the same text and windows is directly comparable (neither adds
a BOS for SmolLM2, whose tokenizer and GGUF both ask for none). An ONNX model runs in
onnxruntime, an artifact folder through ``runtime.load``; an artifact is tokenized with
the metadata of the ONNX file it was compiled from (its manifest records the path).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import onnx

from compiler.progress import SILENT, Progress
from runtime.errors import SparseccError


SCORED = ("all", "second-half")


def window_nll(logits: np.ndarray, ids: np.ndarray, first: int = 0) -> tuple[float, int]:
    """Summed negative log-likelihood of ids[:, first+1:] under logits[:, first:-1], and the count."""
    logits = logits[:, first:-1].astype(np.float64)
    targets = ids[:, first + 1:]
    peak = logits.max(axis=-1, keepdims=True)
    log_norm = np.log(np.exp(logits - peak).sum(axis=-1)) + peak[..., 0]
    picked = np.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return float((log_norm - picked).sum()), int(targets.size)


def _engine(path: str):
    """(model whose metadata decides tokenization, input shape, run(feed) -> logits, name)."""
    if Path(path).is_dir():
        import runtime
        from runtime.artifact import read_manifest

        manifest = read_manifest(path)
        source = manifest.summary.get("source")
        if not isinstance(source, str) or not source or not Path(source).is_file():
            raise SparseccError(f"{path} was compiled from {source or 'an unrecorded file'}, which is gone; "
                                f"eval needs it for the tokenizer.")
        try:  # only its metadata (which tokenizer) is needed
            meta = onnx.load(source, load_external_data=False)
        except Exception as exc:  # protobuf's DecodeError and friends for a file that is not ONNX
            raise SparseccError(f"{path} was compiled from {source}, which is no longer an ONNX model "
                                f"({type(exc).__name__}); eval needs it for the tokenizer.") from None
        compiled = runtime.load(path)
        names = [spec.name for spec in manifest.inputs]
        if names != ["input_ids"]:
            raise SparseccError(f"eval needs a model whose only input is input_ids ({path} takes {', '.join(names)}).")
        shape = list(manifest.inputs[0].shape)
        output = manifest.outputs[0].name
        return meta, shape, lambda feed: compiled.run(feed)[output], "sparsecc runtime"
    import onnxruntime as ort

    from compiler.driver import input_signature
    from compiler.onnx_io import load_model

    model = load_model(path)
    specs = input_signature(model, {})
    if [spec.name for spec in specs] != ["input_ids"]:
        raise SparseccError(f"eval needs a model whose only input is input_ids ({path} takes {', '.join(s.name for s in specs)}).")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return model, list(specs[0].shape), lambda feed: session.run(None, feed)[0], "onnxruntime"


def perplexity(path: str, corpus: str, tokens: int = 4096, progress: Progress = SILENT, scored: str = "all") -> dict:
    """Perplexity of the model at ``path`` on ``corpus`` ('pydoc' or a text file), scoring
    every target of each window (``scored="all"``) or its second half (``"second-half"``)."""
    from sparsify.calibration import calibration_feeds

    if scored not in SCORED:
        raise SparseccError(f"unknown scoring {scored!r}; choose {' or '.join(SCORED)}.")
    if tokens < 1:
        raise SparseccError(f"--tokens must be positive, not {tokens}.")
    if corpus.endswith(".npz"):
        raise SparseccError("eval needs text (a UTF-8 file or 'pydoc'), not an .npz of inputs.")
    start = time.perf_counter()
    meta, shape, run, engine = _engine(path)
    feeds = calibration_feeds(meta, corpus, {"input_ids": shape}, tokens)
    first = shape[-1] // 2 if scored == "second-half" else 0
    total, count = 0.0, 0
    for index, feed in enumerate(feeds, start=1):
        nll, n = window_nll(run(feed), feed["input_ids"], first)
        total, count = total + nll, count + n
        if index % max(1, len(feeds) // 10) == 0 or index == len(feeds):
            progress(f"window {index}/{len(feeds)}: running perplexity {math.exp(total / count):.3f}")
    return {"model": str(path), "corpus": corpus, "engine": engine, "perplexity": math.exp(total / count),
            "nll": total / count, "tokens": count, "scored": scored, "windows": len(feeds), "window": int(np.prod(shape)),
            "seconds": time.perf_counter() - start}
