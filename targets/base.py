"""The interface every target implements, and the pieces of it the targets share.

Each target is a plain class with the same few methods (``Target``); what two targets do
alike is a function here or in the target that owns it (the host build in
``targets.cpu.target``), not a base class.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

import numpy as np
import onnx

LIBRARY = "model.so"
WEIGHTS = "weights.bin"
# Weights start on cache-line boundaries so the kernels' vector loads are aligned.
WEIGHT_ALIGNMENT = 64


@dataclass
class Lowered:
    """A target's program before it is built.

    Attributes:
        module: the target's IR (a TVM IRModule for TVM targets).
        weights: arrays passed to the compiled program after the inputs, in order, as
            (name, array, source initializer name).
        explanations: one line per decision the target made.
    """

    module: object
    weights: list[tuple[str, np.ndarray, str]]
    explanations: list[str] = field(default_factory=list)


class Target(Protocol):
    name: str
    #: What the target's kernels cost per byte (``passes.sparse_formats.KernelCosts``):
    #: the graph passes choose weight formats with it.
    costs: object

    def unsupported_ops(self, model: onnx.ModelProto) -> list[str]:
        """Op types in ``model`` this target cannot compile, sorted, each once."""

    def legalize(self, model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[tuple[str, np.ndarray, str]], list[str]]:
        """Target-specific ONNX rewrites; returns the model, the weights lifted out of it,
        and explanations."""

    def lower(self, model: onnx.ModelProto, weights, input_shapes: dict[str, list[int]],
              dump: Callable[[str, str], None] | None = None) -> Lowered:
        """ONNX to the target's IR."""

    def build(self, lowered: Lowered, staging: Path, dump: Callable[[str, str], None] | None = None) -> dict:
        """Builds into ``staging``; returns the manifest's ``target`` dict, ``weights``
        entries, and the ``library`` and ``weights_file`` names."""


def lower_onnx(import_onnx: Callable, model: onnx.ModelProto, weights, input_shapes: dict[str, list[int]],
               dump: Callable[[str, str], None] | None = None) -> Lowered:
    """A legalized model to Relax with the target's ``import_onnx(model, shapes, dtypes)``:
    the graph inputs take their shapes and dtypes, the lifted weights their arrays'
    shapes, and the weights are passed after the inputs."""
    shapes = dict(input_shapes)
    dtypes = {}
    for value in model.graph.input:
        elem = value.type.tensor_type.elem_type
        dtypes[value.name] = onnx.helper.tensor_dtype_to_np_dtype(elem).name
    for name, array, _ in weights:
        shapes[name] = list(array.shape)
    module = import_onnx(model, shapes, dtypes)
    if dump:
        dump("relax-imported.py", module.script())
    return Lowered(module, weights)


def write_weights(path: Path, weights) -> list[dict]:
    """Writes the weights back to back, aligned; returns their manifest entries."""
    entries = []
    offset = 0
    with open(path, "wb") as handle:
        for name, array, source in weights:
            padding = -offset % WEIGHT_ALIGNMENT
            handle.write(b"\0" * padding)
            offset += padding
            data = np.ascontiguousarray(array)
            handle.write(data.tobytes())
            entries.append({"name": name, "shape": list(data.shape), "dtype": data.dtype.name,
                            "offset": offset, "nbytes": data.nbytes, "source": source})
            offset += data.nbytes
    return entries
