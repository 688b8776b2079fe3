"""Loading and saving ONNX models with clear errors and no half-written or mismatched files.

A model is saved as a pair: the graph ``NAME.onnx`` and its weights ``NAME.onnx.data``.
Both are written under fresh hidden names beside the target, then renamed into place,
the data file first and the graph last, so the graph that names a data file never
appears before it. A kill between the two renames can still leave an old graph beside
new data; the graph records its data file's sha256 (``sparsecc.data_sha256``), and
``load_model`` refuses a pair whose hashes disagree instead of reading wrong weights.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import onnx
from onnx.external_data_helper import set_external_data, uses_external_data

from compiler.output_file import check_output_file, create_partial
from runtime.errors import SparseccError, cannot_write

# Tensors of at least this many bytes go to the external data file beside the model.
EXTERNAL_DATA_THRESHOLD = 1024
# The graph's metadata key holding the sha256 of the data file it was written with.
DATA_SHA256_KEY = "sparsecc.data_sha256"


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_pair(model: onnx.ModelProto, path: Path) -> None:
    """Refuses a graph whose external data file is not the one it was saved with."""
    recorded = next((prop.value for prop in model.metadata_props if prop.key == DATA_SHA256_KEY), None)
    locations = {entry.value for tensor in _tensors(model.graph) if uses_external_data(tensor)
                 for entry in tensor.external_data if entry.key == "location"}
    if recorded is None or len(locations) != 1:
        return  # not written by sparsecc (or without external data): nothing recorded to check
    data = path.parent / next(iter(locations))
    try:
        actual = _sha256_file(data)
    except OSError:
        return  # the loader names the missing or unreadable file
    if actual != recorded:
        raise SparseccError(f"{path} and {data.name} do not belong together (the data file is not the one this graph "
                            "was saved with, e.g. after an interrupted overwrite); export or save the model again.")


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
    _check_pair(model, path)
    try:
        onnx.load_external_data_for_model(model, str(path.parent))
    except Exception as exc:
        raise SparseccError(f"{path}: its external weight data cannot be read ({exc}).") from None
    return model


def _tensors(graph: onnx.GraphProto):
    """Every initializer of ``graph`` and of the subgraphs in its nodes' attributes."""
    yield from graph.initializer
    for node in graph.node:
        for attribute in node.attribute:
            for subgraph in ([attribute.g] if attribute.HasField("g") else []) + list(attribute.graphs):
                yield from _tensors(subgraph)


def save_model(model: onnx.ModelProto, path: str | os.PathLike) -> None:
    """Saves ``model`` to ``path`` with its large tensors in ``path.data`` (see the module
    docstring for the order of the writes); ``model`` itself is left as it was.

    Raises:
        SparseccError: when the files cannot be written (full disk, read-only folder, a
            file where the folder should be); nothing is left half-written then.
    """
    path = Path(path)
    data_name = path.name + ".data"
    external = [tensor for tensor in _tensors(model.graph)
                if tensor.HasField("raw_data") and len(tensor.raw_data) >= EXTERNAL_DATA_THRESHOLD]
    properties = [(prop.key, prop.value) for prop in model.metadata_props]
    check_output_file(path)
    check_output_file(path.with_name(data_name))
    partials: list[Path] = []
    raw = [tensor.raw_data for tensor in external]
    try:
        if external:
            data_partial, fd = create_partial(path)
            partials.append(data_partial)
            digest, offset = hashlib.sha256(), 0
            with os.fdopen(fd, "wb") as handle:
                for tensor, data in zip(external, raw):
                    handle.write(data)
                    digest.update(data)
                    set_external_data(tensor, data_name, offset, len(data))
                    tensor.data_location = onnx.TensorProto.EXTERNAL
                    tensor.ClearField("raw_data")
                    offset += len(data)
        # A hash carried over from the file this model was loaded from is not this one's.
        del model.metadata_props[:]
        for key, value in properties:
            if key != DATA_SHA256_KEY:
                model.metadata_props.add(key=key, value=value)
        if external:
            model.metadata_props.add(key=DATA_SHA256_KEY, value=digest.hexdigest())
        graph_partial, fd = create_partial(path)
        partials.append(graph_partial)
        with os.fdopen(fd, "wb") as handle:
            handle.write(model.SerializeToString())
        if external:
            os.replace(data_partial, path.with_name(data_name))
        os.replace(graph_partial, path)
    except OSError as exc:
        raise cannot_write(path, exc) from None
    finally:
        for tensor, data in zip(external, raw):
            tensor.raw_data = data
            tensor.data_location = onnx.TensorProto.DEFAULT
            del tensor.external_data[:]
        del model.metadata_props[:]
        for key, value in properties:
            model.metadata_props.add(key=key, value=value)
        for partial in partials:
            partial.unlink(missing_ok=True)
