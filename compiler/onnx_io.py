"""Loading and saving ONNX models with clear errors and no half-written files."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import onnx

from runtime.errors import SparseccError

# Tensors above this many bytes go to the external data file beside the model.
EXTERNAL_DATA_THRESHOLD = 1024


def load_model(path: str | os.PathLike) -> onnx.ModelProto:
    """Loads an ONNX model and its external data, or raises one clear sentence."""
    path = Path(path)
    if not path.exists():
        raise SparseccError(f"{path}: no such file.")
    if path.is_dir():
        raise SparseccError(f"{path} is a directory, not an ONNX file.")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises a zoo of types for garbage input
        raise SparseccError(f"{path} is not an ONNX model ({type(exc).__name__}).") from None
    if not model.graph.node and not model.graph.output:
        raise SparseccError(f"{path} is not an ONNX model (it has no graph).")
    try:
        onnx.load_external_data_for_model(model, str(path.parent))
    except Exception as exc:
        raise SparseccError(f"{path}: its external weight data cannot be read ({exc}).") from None
    return model


def save_model(model: onnx.ModelProto, path: str | os.PathLike) -> None:
    """Saves ``model`` to ``path`` (weights in ``path.data``), atomically.

    Everything is written in a temporary folder beside the target and moved into place
    only when complete, so an interrupted save leaves no partial model behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data_name = path.name + ".data"
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        onnx.save_model(
            model,
            str(staging / path.name),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=data_name,
            size_threshold=EXTERNAL_DATA_THRESHOLD,
        )
        # onnx.save_model moved the weights out of `model`; bring them back so the
        # caller's object stays usable.
        onnx.load_external_data_for_model(model, str(staging))
        if (staging / data_name).exists():
            os.replace(staging / data_name, path.parent / data_name)
        os.replace(staging / path.name, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
