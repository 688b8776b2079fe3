"""The schema of an artifact's manifest, checked in one place before anything else is used.

``runtime.artifact.read_manifest`` calls ``check_manifest`` on the parsed JSON before it
builds the dataclasses or touches a file: every field the runtime reads has its type and
range checked here, so a hand-edited or crafted manifest (``files`` as a list, ``isa`` as
a number, a weight's offset as text, a negative shape, a neuro artifact without its chip,
JSON nested a thousand deep) ends in one sentence naming the field, not in an exception
from deep inside the loader. Fields only people read (``summary``) may hold any JSON.
"""

from __future__ import annotations

import math
import re

from runtime.errors import SparseccError
from runtime.memory import check_fits

# Our manifests nest at most 6 deep (a neuro layer's placement); this leaves room.
MAX_DEPTH = 20
# The dtypes the targets write for inputs, outputs and weights (numpy's names).
DTYPES = {"bool": 1, "int8": 1, "uint8": 1, "int16": 2, "uint16": 2, "float16": 2, "int32": 4, "uint32": 4,
          "float32": 4, "int64": 8, "uint64": 8, "float64": 8}
SHA256 = re.compile(r"[0-9a-f]{64}")


class ManifestError(Exception):
    """A field of the wrong type or out of range: ``where`` names it (``weights[3].offset``)."""

    def __init__(self, where: str, wanted: str, value: object = None, missing: bool = False):
        shown = repr(value) if not isinstance(value, (dict, list)) else type(value).__name__
        super().__init__(f"{where} is missing (it must be {wanted})" if missing else f"{where} must be {wanted}, not {shown[:60]}")


def _depth(value: object) -> int:
    """How deep ``value`` nests, found without recursion (so any depth is safe to measure)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        deepest = max(deepest, level)
        if level > MAX_DEPTH:
            break
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        stack.extend((child, level + 1) for child in children)
    return deepest


def _get(data: dict, key: str, where: str, kind, wanted: str, required: bool = True, default=None):
    if key not in data:
        if required:
            raise ManifestError(f"{where}{key}", wanted, missing=True)
        return default
    value = data[key]
    if not kind(value):
        raise ManifestError(f"{where}{key}", wanted, value)
    return value


def is_text(value) -> bool:
    return isinstance(value, str)


def is_count(value) -> bool:  # a whole number >= 0 (JSON's true is not one)
    return type(value) is int and value >= 0


def is_positive(value) -> bool:
    return type(value) is int and value >= 1


def is_dict(value) -> bool:
    return isinstance(value, dict)


def _list_of(check):
    return lambda value: isinstance(value, list) and all(check(item) for item in value)


def _tensor(data, where: str, weight: bool = False) -> None:
    if not isinstance(data, dict):
        raise ManifestError(where, "an object", data)
    _get(data, "name", f"{where}.", is_text, "text")
    shape = _get(data, "shape", f"{where}.", _list_of(is_count), "a list of whole numbers >= 0")
    dtype = _get(data, "dtype", f"{where}.", lambda d: isinstance(d, str) and d in DTYPES, f"one of {', '.join(DTYPES)}")
    nbytes = math.prod(shape) * DTYPES[dtype]
    check_fits(nbytes, f"the manifest's {where} of shape {shape}")
    if weight:
        _get(data, "offset", f"{where}.", is_count, "a whole number >= 0")
        _get(data, "nbytes", f"{where}.", lambda n: n == nbytes, f"{nbytes} (its shape times {DTYPES[dtype]} bytes)")
        _get(data, "source", f"{where}.", is_text, "text", required=False)


def _tensors(data: dict, key: str, where: str, weight: bool = False, required: bool = True) -> list:
    items = _get(data, key, where, lambda v: isinstance(v, list), "a list", required=required, default=[])
    for index, item in enumerate(items):
        _tensor(item, f"{where}{key}[{index}]", weight)
    return items


def _target(target: dict, weight_names: set) -> None:
    name = _get(target, "name", "target.", is_text, "text")

    def named(value) -> bool:
        return isinstance(value, str) and value in weight_names

    for key in ("mcpu", "arch", "llvm_target", "host_machine"):
        _get(target, key, "target.", is_text, "text", required=False)
    _get(target, "isa", "target.", _list_of(is_text), "a list of instruction-set names", required=False)
    _get(target, "num_threads", "target.", is_count, "a whole number >= 0", required=False)
    if name != "neuro":
        _get(target, "event_library", "target.", is_text, "text", required=False)
        return
    _get(target, "chip", "target.", lambda c: isinstance(c, dict) and isinstance(c.get("name"), str),
         "the chip model the artifact was mapped on (an object with a name)")
    _get(target, "event_library", "target.", is_text, "text")
    _get(target, "program_weights", "target.", _list_of(named), "a list of its weights' names")
    layers = _get(target, "layers", "target.", _list_of(is_dict), "a list of layer objects")
    for index, layer in enumerate(layers):
        where = f"target.layers[{index}]."
        _get(layer, "name", where, is_text, "text")
        _get(layer, "shape", where, lambda s: _list_of(is_positive)(s) and len(s) == 2, "[K, N]")
        _get(layer, "step", where, is_count, "a whole number >= 0")
        _get(layer, "tables", where, lambda t: isinstance(t, dict) and all(
            named(t.get(part)) for part in ("row_ptr", "cols", "vals", "core_cols")),
            "an object naming its row_ptr, cols, vals and core_cols weights")
        _get(layer, "threshold", where, lambda t: t is None or t == "" or named(t), "a weight's name, \"\" or null",
             required=False)
        _get(layer, "source_cores", where, _list_of(is_count), "a list of core numbers")
        _get(layer, "placement", where, lambda p: isinstance(p, dict) and _list_of(is_count)(p.get("cores"))
             and _list_of(is_count)(p.get("columns")), "an object with lists of cores and columns")


def _decoding(decoding: dict) -> None:
    for key in ("prefill_len", "layers", "kv_heads", "head_dim", "vocab_size"):
        _get(decoding, key, "decoding.", is_positive, "a whole number >= 1")
    _get(decoding, "max_context", "decoding.", lambda n: type(n) is int and n >= 2, "a whole number >= 2")
    _get(decoding, "eos_token_ids", "decoding.", _list_of(is_count), "a list of token ids", required=False)
    # Absent in artifacts of older layouts, which runtime.decoder names as such.
    _get(decoding, "key_layout", "decoding.", is_text, "text", required=False)
    _get(decoding, "tokenizer", "decoding.", lambda t: t is None or isinstance(t, str), "a file name or null",
         required=False)


def check_manifest(data: object, path) -> None:
    """Refuses a manifest with any field of the wrong type or out of range, in one sentence.

    Raises:
        SparseccError: naming the first wrong field.
    """
    if not isinstance(data, dict):
        raise SparseccError(f"{path} is not a sparsecc artifact (its manifest is not a JSON object).")
    if _depth(data) > MAX_DEPTH:
        raise SparseccError(f"{path} is corrupt: its manifest nests deeper than {MAX_DEPTH} levels.")
    try:
        for key in ("format", "sparsecc_version", "library", "weights_file"):
            _get(data, key, "", is_text, "text", required=key in ("format", "sparsecc_version"))
        _get(data, "format_version", "", is_positive, "a whole number >= 1")
        _get(data, "files", "", lambda f: isinstance(f, dict) and all(
            isinstance(v, str) and SHA256.fullmatch(v) for v in f.values()), "an object of file name: sha256")
        _get(data, "summary", "", is_dict, "an object", required=False)
        _tensors(data, "inputs", "")
        if not _tensors(data, "outputs", ""):
            raise ManifestError("outputs", "a list of at least one output", [])
        weights = _tensors(data, "weights", "", weight=True)
        ranges = _get(data, "input_ranges", "", is_dict, "an object", required=False, default={})
        for name, bounds in ranges.items():
            if not (isinstance(bounds, list) and len(bounds) == 2 and all(type(b) is int for b in bounds)
                    and bounds[0] < bounds[1]):
                raise ManifestError(f"input_ranges.{name}", "[low, high] with low < high", bounds)
        graphs = _get(data, "graphs", "", is_dict, "an object", required=False, default={})
        for graph, spec in graphs.items():
            where = f"graphs.{graph}."
            if not isinstance(spec, dict):
                raise ManifestError(where[:-1], "an object", spec)
            _get(spec, "library", where, is_text, "text")
            _tensors(spec, "inputs", where)
            _tensors(spec, "outputs", where)
            weights = weights + _tensors(spec, "weights", where, weight=True)
        target = _get(data, "target", "", is_dict, "an object")
        _target(target, {weight["name"] for weight in weights})
        decoding = _get(data, "decoding", "", is_dict, "an object", required=False)
        if decoding:
            _decoding(decoding)
    except ManifestError as exc:
        raise SparseccError(f"{path} is corrupt: its manifest's {exc}.") from None
