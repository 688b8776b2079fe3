"""The interface every target implements."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

import numpy as np
import onnx


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
