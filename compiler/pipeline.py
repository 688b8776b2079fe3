"""The compile pipeline, as a flat list of phases.

Each ONNX phase is ModelProto in, ModelProto out (``passes.PassResult``); with a dump
folder the model is saved after every phase so a user can look at what each one did.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import onnx

from compiler.progress import Progress
from passes.base import PassResult
from passes.fold_pruning_masks import fold_pruning_masks
from passes.simplify_shapes import simplify_shapes


@dataclass(frozen=True)
class Phase:
    name: str
    run: Callable[[onnx.ModelProto], PassResult]


def onnx_phases(input_shapes: dict[str, list[int]]) -> list[Phase]:
    """The graph passes every target gets, in order."""
    return [
        # Pruning masks (weight_orig * weight_mask) become one weight with real zeros.
        Phase("fold_pruning_masks", fold_pruning_masks),
        # Concrete input shapes; shape arithmetic and weight transposes folded away.
        Phase("simplify_shapes", lambda model: simplify_shapes(model, input_shapes)),
    ]



def run_onnx_phases(model: onnx.ModelProto, input_shapes: dict[str, list[int]], progress: Progress,
                    dump_dir: Path | None = None, explanations: list[str] | None = None) -> onnx.ModelProto:
    """Runs the ONNX phases; returns the final model."""
    from compiler.onnx_io import save_model

    for index, phase in enumerate(onnx_phases(input_shapes), start=1):
        with progress.step(phase.name):
            result = phase.run(model)
        model = result.model
        if explanations is not None:
            explanations.extend(result.explanations)
        if dump_dir is not None:
            save_model(model, dump_dir / f"{index:02d}-{phase.name}.onnx")
    return model
