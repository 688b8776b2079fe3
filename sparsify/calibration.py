"""Calibration, in one place: its inputs, one onnxruntime sampler, one threshold fitter.

Inputs are a text corpus (tokenized) or an .npz of input arrays (``calibration_feeds``),
or, for a decoder's prefill graph, windows of text at position 0 (``decoder_feeds``).

The sampler (``collect_stats``) runs the model in onnxruntime one batch at a time with
the tensors asked for as extra outputs, and keeps of each a bounded random sample (of its
values, or of its token rows) and, if asked, per-channel sums.

The fitter (``fit_thresholds``) gives every activation gate its magnitude threshold: for
a tensor X sampled as the values x_1..x_S and a level L (the fraction of X to zero),

    t = quantile(|x|, L),   measured = mean(|x| <= t)        (L > 0)
    t = 0,                  measured = mean(x == 0)          (L = 0: an exact gate)

It serves ``sparsecc compile --activation-sparsity L`` (one L for every gated tensor:
``calibrate_thresholds``), a decoder (fitted on its prefill graph, handed to its decode
graph by ``compiler.decode_build``), ``sparsecc sparsify --activations teal:L`` (an L
per tensor from TEAL's greedy allocation, fitted on sampled token rows) and ``cats:L``
(one L for every SiLU output). The sampler also gives sparsify's calibrated weight
methods their per-channel statistics (``sparsify.stats`` binds it to the sparsify options).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from compiler.progress import SILENT, Progress
from passes.base import embedding_rows
from passes.insert_activation_gates import gated_inputs, probe_session
from runtime.errors import SparseccError

SOURCE_KEY = "sparsecc.source"  # metadata written by `sparsecc export`
# Values kept per tensor to estimate its quantile; enough for a threshold within a
# fraction of a percent of sparsity, small enough to keep calibration memory bounded.
SAMPLES_PER_TENSOR = 1 << 18


def _signature(model: onnx.ModelProto) -> list[tuple[str, list[int], int]]:
    initializers = {init.name for init in model.graph.initializer}
    specs = []
    for value in model.graph.input:
        if value.name in initializers:
            continue
        tensor_type = value.type.tensor_type
        specs.append((value.name, [d.dim_value for d in tensor_type.shape.dim], tensor_type.elem_type))
    return specs


def _text_tokens(corpus: str, model: onnx.ModelProto, vocab_size: int | None) -> np.ndarray:
    from runtime.corpus import pydoc_text

    if corpus == "pydoc":
        text = pydoc_text()
    else:
        path = Path(corpus)
        if not path.is_file():
            raise SparseccError(f"calibration corpus {corpus}: no such file (give a text file, an .npz, or 'pydoc').")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise SparseccError(f"calibration corpus {corpus} is not UTF-8 text.") from None
    source = next((p.value for p in model.metadata_props if p.key == SOURCE_KEY), None)
    tokenizer = None
    if source:
        from compiler.export import load_tokenizer

        try:
            tokenizer = load_tokenizer(source, progress=lambda *_: None)
        except SparseccError:
            tokenizer = None
    if tokenizer is not None:
        return np.asarray(tokenizer(text[:2_000_000])["input_ids"], dtype=np.int64)
    # No tokenizer (random-weight test models, foreign ONNX files): bytes as token ids.
    ids = np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)
    vocab_size = vocab_size or embedding_rows(model)
    return ids % vocab_size if vocab_size else ids


def calibration_feeds(model: onnx.ModelProto, corpus: str, input_shapes: dict[str, list[int]],
                      max_tokens: int = 2048, vocab_size: int | None = None) -> list[dict[str, np.ndarray]]:
    """Input batches for calibration.

    Args:
        model: the ONNX model (its inputs and metadata decide how the corpus is read).
        corpus: ``pydoc``, a UTF-8 text file (for models taking ``input_ids``), or an
            ``.npz`` whose arrays are named like the inputs, either one batch of the
            model's input shape or several stacked along a new first axis.
        input_shapes: the concrete input shapes the model will be compiled for.
        max_tokens: tokens of text to use, in windows of the model's sequence length.
        vocab_size: bound for byte-level token ids when the model has no tokenizer.
    """
    specs = _signature(model)
    if corpus.endswith(".npz"):
        if not Path(corpus).is_file():
            raise SparseccError(f"calibration file {corpus}: no such file.")
        try:
            data = np.load(corpus, allow_pickle=False)
        except Exception as exc:
            raise SparseccError(f"{corpus} is not a readable .npz file ({exc.__class__.__name__}).") from None
        missing = [name for name, _, _ in specs if name not in data.files]
        if missing:
            raise SparseccError(f"{corpus} has no array named {missing[0]!r} (it has {', '.join(data.files) or 'none'}).")
        batches = []
        for name, _, _ in specs:
            try:
                array = data[name]
            except Exception as exc:  # object arrays (pickles, refused), a damaged entry
                raise SparseccError(f"{corpus}: array {name!r} cannot be read ({str(exc).splitlines()[0][:120]}).") from None
            shape = input_shapes[name]
            if list(array.shape) == shape:
                array = array[None]
            elif list(array.shape[1:]) != shape:
                raise SparseccError(f"{corpus}: array {name!r} has shape {list(array.shape)}, not {shape} or [samples, *{shape}].")
            batches.append(array)
        return [{name: batch[i] for (name, _, _), batch in zip(specs, batches)} for i in range(len(batches[0]))]
    names = [name for name, _, _ in specs]
    if names != ["input_ids"]:
        raise SparseccError(f"a text corpus needs a model whose only input is input_ids (this one takes {', '.join(names)}); give an .npz of inputs.")
    batch, seq_len = input_shapes["input_ids"]
    tokens = _text_tokens(corpus, model, vocab_size)
    window = batch * seq_len
    count = max(1, min(len(tokens), max_tokens) // window)
    if len(tokens) < window:
        raise SparseccError(f"calibration corpus {corpus} has {len(tokens)} tokens, fewer than one batch of {window}.")
    return [{"input_ids": tokens[i * window:(i + 1) * window].reshape(batch, seq_len)} for i in range(count)]


def decoder_feeds(model: onnx.ModelProto, corpus: str, prefill_len: int, max_tokens: int, vocab_size: int,
                  metadata: onnx.ModelProto | None = None) -> list[dict[str, np.ndarray]]:
    """Input batches for a decoder's prefill graph: windows of ``prefill_len`` tokens of
    ``corpus`` at position 0 with an empty (all-zero) cache, as many as ``max_tokens`` fill.

    Args:
        model: the prefill graph (its ``past_*`` inputs give the cache's shapes).
        corpus: ``pydoc`` or a UTF-8 text file.
        prefill_len: tokens per window (the export's ``--prefill-len``).
        max_tokens: tokens of text to use.
        vocab_size: bound for byte-level token ids when the model has no tokenizer.
        metadata: a model whose metadata names the tokenizer (default: ``model``).
    """
    tokens = _text_tokens(corpus, metadata if metadata is not None else model, vocab_size)
    count = max(1, min(len(tokens), max_tokens) // prefill_len)
    feeds = []
    for i in range(count):
        window = tokens[i * prefill_len:(i + 1) * prefill_len]
        if len(window) < prefill_len:
            break
        feed = {"input_ids": window.reshape(1, prefill_len), "position": np.zeros(1, np.int64)}
        feed.update({value.name: np.zeros([d.dim_value for d in value.type.tensor_type.shape.dim], np.float32)
                     for value in model.graph.input if value.name.startswith("past_")})
        feeds.append(feed)
    return feeds


@dataclass
class TensorStats:
    """What the sampler keeps of one tensor X (last axis: channels) over all batches.

    Attributes:
        sumsq, sumabs: per-channel sums of X^2 and |X| over all token rows (float64), when
            asked for (``sums``), else None.
        count: token rows seen.
        rows: random token rows of X (float32), one array per batch.
        values: random values of |X| (float32), one array per batch.
    """

    sumsq: np.ndarray | None = None
    sumabs: np.ndarray | None = None
    count: int = 0
    rows: list = field(default_factory=list)
    values: list = field(default_factory=list)

    @property
    def norms(self) -> np.ndarray:
        return np.sqrt(self.sumsq)

    @property
    def mean_abs(self) -> np.ndarray:
        return self.sumabs / max(self.count, 1)

    @property
    def sample(self) -> np.ndarray:
        """The sampled token rows, [rows, channels]."""
        return np.concatenate(self.rows).astype(np.float32)

    @property
    def magnitudes(self) -> np.ndarray:
        """The sampled values of |X|, flat."""
        return np.concatenate(self.values)


def collect_stats(model: onnx.ModelProto, tensors: list[str], feeds: list[dict], progress: Progress = SILENT,
                  rows: int = 0, seed: int = 0, paired: bool = False, values: int = 0,
                  sums: bool = True) -> dict[str, TensorStats]:
    """Runs ``model`` in onnxruntime on ``feeds`` batch by batch and samples ``tensors``.

    Args:
        model: the model; ``tensors`` are exposed as extra outputs of a copy of it.
        tensors: names of the tensors to sample (each once, in sorted order: the random
            draws follow that order, so the sample does not depend on the caller's).
        feeds: the input batches.
        progress: receives a line about every tenth batch.
        rows: token rows to keep per tensor, spread evenly over the batches (0: none).
        seed: seed of the random draws.
        paired: the same token rows for every tensor (they must have the same rows).
        values: values of |X| to keep per tensor, spread evenly over the batches (0: none).
        sums: accumulate the per-channel sums (``sumsq``, ``sumabs``).
    """
    tensors = sorted(set(tensors))
    session = probe_session(model, tensors)
    rng = np.random.default_rng(seed)
    stats: dict[str, TensorStats] = {}
    rows_per_batch = -(-rows // max(1, len(feeds))) if rows else 0
    values_per_batch = max(1, values // max(1, len(feeds))) if values else 0
    for index, feed in enumerate(feeds, start=1):
        take = None
        for name, value in zip(tensors, session.run(tensors, feed)):
            entry = stats.setdefault(name, TensorStats())
            flat = value.reshape(-1, value.shape[-1])
            entry.count += flat.shape[0]
            if sums:
                wide = flat.astype(np.float64)
                if entry.sumsq is None:
                    entry.sumsq, entry.sumabs = np.zeros(wide.shape[1]), np.zeros(wide.shape[1])
                entry.sumsq += (wide * wide).sum(axis=0)
                entry.sumabs += np.abs(wide).sum(axis=0)
            if rows_per_batch:
                if take is None or not paired:
                    take = np.sort(rng.choice(flat.shape[0], min(rows_per_batch, flat.shape[0]), replace=False))
                entry.rows.append(flat[take].astype(np.float32))
            if values_per_batch:
                magnitudes = np.abs(value).ravel()
                if magnitudes.size > values_per_batch:
                    magnitudes = rng.choice(magnitudes, values_per_batch, replace=False)
                entry.values.append(magnitudes)
        if index % max(1, len(feeds) // 10) == 0 or index == len(feeds):
            progress(f"calibration batch {index}/{len(feeds)}: {len(tensors)} tensors")
    return stats


def fit_thresholds(magnitudes: dict[str, np.ndarray], levels: dict[str, float]) -> tuple[dict[str, float], dict[str, float]]:
    """Per-tensor magnitude thresholds zeroing the fraction ``levels[name]`` of the sampled
    ``magnitudes[name]`` (|X|, any shape); the formula is in the module docstring.

    Returns:
        (thresholds, measured sparsity on the sample) per tensor of ``levels``.
    """
    thresholds, measured = {}, {}
    for name, level in levels.items():
        sample = magnitudes[name]
        thresholds[name] = float(np.quantile(sample, level)) if level > 0 else 0.0
        measured[name] = float((sample <= thresholds[name]).mean()) if level > 0 else float((sample == 0).mean())
    return thresholds, measured


def calibrate_thresholds(model: onnx.ModelProto, tensors: list[str], feeds: list[dict[str, np.ndarray]],
                         sparsity: float, seed: int = 0) -> tuple[dict[str, float], dict[str, float]]:
    """Thresholds reaching ``sparsity`` on every one of ``tensors`` over ``feeds``, fitted
    on a sample of ``SAMPLES_PER_TENSOR`` values of each.

    Returns:
        (thresholds, measured sparsity on the calibration data) per tensor.
    """
    stats = collect_stats(model, tensors, feeds, values=SAMPLES_PER_TENSOR, seed=seed, sums=False)
    return fit_thresholds({name: stats[name].magnitudes for name in tensors}, dict.fromkeys(tensors, sparsity))


def gate_thresholds(model: onnx.ModelProto, feeds: list[dict[str, np.ndarray]], sparsity: float,
                    progress: Progress = SILENT, described: str = "the calibration data") -> tuple[dict[str, float], dict[str, float]]:
    """``calibrate_thresholds`` for every input of ``model``'s linear layers that
    ``insert_activation_gates`` gates: what ``sparsecc compile --activation-sparsity`` fits.

    Args:
        described: what ``feeds`` are, for the progress line.
    """
    tensors = sorted(gated_inputs(model))
    progress(f"calibrating {len(tensors)} gates on {described}")
    return calibrate_thresholds(model, tensors, feeds, sparsity)
