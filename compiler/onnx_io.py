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
import math
import os
from pathlib import Path

import onnx
from onnx.external_data_helper import set_external_data, uses_external_data

from compiler.output_file import check_output_file, create_partial
from runtime.errors import SparseccError, cannot_write
from runtime.memory import check_fits

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
    check_model(model, path)
    _check_pair(model, path)
    try:
        onnx.load_external_data_for_model(model, str(path.parent))
    except Exception as exc:
        raise SparseccError(f"{path}: its external weight data cannot be read ({exc}).") from None
    _check_initializer_sizes(model, path)
    return model


def check_model(model: onnx.ModelProto, path: Path) -> None:
    """Refuses, in one sentence, what onnx's full check refuses (with strict shape and
    type inference: duplicate tensor names, type mismatches, invalid dtypes, data of
    the wrong size), an opset newer than this onnx knows, and any tensor whose inferred
    static shape would not fit in the machine's memory. ``model`` is the graph without
    its external data, so the check reads no weights."""
    newest = onnx.defs.onnx_opset_version()
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx") and opset.version > newest:
            raise SparseccError(f"{path} uses ONNX opset {opset.version}; the newest this onnx knows is {newest}.")
    try:
        # Our ai.sparsecc functions import the opset they were written for, which may be
        # older than the model's; onnxruntime runs them, so that mismatch is no error.
        onnx.checker.check_model(str(path), full_check=True, skip_opset_compatibility_check=True)
        inferred = onnx.shape_inference.infer_shapes(model)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError, ValueError) as exc:
        detail = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        raise SparseccError(f"{path} is not a valid ONNX model: {detail[:300].rstrip('.')}.") from None
    for value in (*model.graph.input, *model.graph.output):
        if value.type.tensor_type.elem_type == onnx.TensorProto.UNDEFINED:  # the checker lets it pass; onnxruntime not
            raise SparseccError(f"{path} is not a valid ONNX model: its input or output {value.name!r} has no element type.")
    weights = {node.input[1] for node in model.graph.node if node.op_type in ("MatMul", "Gemm") and len(node.input) > 1}
    for tensor in model.graph.initializer:
        if tensor.name in weights and 0 in tensor.dims:
            raise SparseccError(f"{path}: the linear weight {tensor.name!r} has shape {list(tensor.dims)}, with no elements.")
    graph = inferred.graph
    for value in (*graph.input, *graph.value_info, *graph.output):
        tensor_type = value.type.tensor_type
        dims = [dim.dim_value if dim.HasField("dim_value") else None for dim in tensor_type.shape.dim]
        if None in dims or not tensor_type.HasField("shape"):
            continue  # symbolic: sized when it is given (--shape) and checked then
        check_fits(_nbytes(dims, tensor_type.elem_type), f"{path}: tensor {value.name!r} of shape {dims}")


def _nbytes(dims, elem_type: int) -> int:
    """Bytes of a tensor as raw data: 4-bit types pack two elements a byte."""
    count = math.prod(dims)
    if elem_type in PACKED_4BIT:
        return (count + 1) // 2
    try:
        return count * onnx.helper.tensor_dtype_to_np_dtype(elem_type).itemsize
    except (KeyError, TypeError, ValueError):
        return count


PACKED_4BIT = {getattr(onnx.TensorProto, name) for name in ("INT4", "UINT4", "FLOAT4E2M1") if hasattr(onnx.TensorProto, name)}


def _check_initializer_sizes(model: onnx.ModelProto, path: Path) -> None:
    """Refuses an initializer whose bytes disagree with its dims (the checker sees only
    the embedded ones; an external tensor's bytes are read from its ``length``)."""
    for tensor in _tensors(model.graph):
        if tensor.HasField("raw_data") and tensor.data_type != onnx.TensorProto.STRING:
            expected = _nbytes(tensor.dims, tensor.data_type)
            if len(tensor.raw_data) != expected:
                raise SparseccError(f"{path}: initializer {tensor.name!r} of shape {list(tensor.dims)} holds "
                                    f"{len(tensor.raw_data)} bytes, not {expected}.")


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
