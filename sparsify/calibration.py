"""Calibration inputs: a text corpus (tokenized) or an .npz of input arrays."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

from passes.base import embedding_rows
from runtime.errors import SparseccError

SOURCE_KEY = "sparsecc.source"  # metadata written by `sparsecc export`


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
            array, shape = data[name], input_shapes[name]
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
