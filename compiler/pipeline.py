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
from passes.dense_to_sparse import dense_to_sparse
from passes.drop_dead_neurons import drop_dead_neurons
from passes.fold_pruning_masks import fold_pruning_masks
from passes.fuse_gated_matmul import fuse_gated_matmul
from passes.guard_gather_indices import guard_gather_indices
from passes.insert_activation_gates import insert_activation_gates
from passes.simplify_shapes import simplify_shapes


@dataclass(frozen=True)
class Phase:
    name: str
    run: Callable[[onnx.ModelProto], PassResult]


@dataclass(frozen=True)
class Gating:
    """How activation gates are set: thresholds per tensor, or a way to calibrate them."""

    thresholds: dict[str, float] | None = None
    calibrate: Callable[[onnx.ModelProto], tuple[dict[str, float], dict[str, float]]] | None = None


def _gate_phase(gating: Gating) -> Callable[[onnx.ModelProto], PassResult]:
    def run(model: onnx.ModelProto) -> PassResult:
        if gating.thresholds is not None:
            return insert_activation_gates(model, gating.thresholds)
        thresholds, measured = gating.calibrate(model)
        return insert_activation_gates(model, thresholds, measured)

    return run


def onnx_phases(input_shapes: dict[str, list[int]], gating: Gating | None = None) -> list[Phase]:
    """The graph passes every target gets, in order."""
    phases = [
        # Pruning masks (weight_orig * weight_mask) become one weight with real zeros.
        Phase("fold_pruning_masks", fold_pruning_masks),
        # Concrete input shapes; shape arithmetic and weight transposes folded away.
        Phase("simplify_shapes", lambda model: simplify_shapes(model, input_shapes)),
        # Neurons whose outgoing weights are all zero leave the matmuls (structured pruning).
        Phase("drop_dead_neurons", drop_dead_neurons),
    ]
    if gating is not None:
        # Activation sparsity: a calibrated magnitude gate on every linear input.
        phases.append(Phase("insert_activation_gates", _gate_phase(gating)))
    phases += [
        # Sparse weights become SparseMatMul where a sparse kernel is predicted faster.
        Phase("dense_to_sparse", dense_to_sparse),
        # A gate and the linear layers it feeds become one GatedMatMul per format.
        Phase("fuse_gated_matmul", fuse_gated_matmul),
        # Table lookups stay in their tables: input-fed indices get a range the runtime
        # checks, computed ones are wrapped into the table.
        Phase("guard_gather_indices", guard_gather_indices),
    ]
    return phases


def run_onnx_phases(model: onnx.ModelProto, input_shapes: dict[str, list[int]], progress: Progress,
                    dump_dir: Path | None = None, explanations: list[str] | None = None,
                    gating: Gating | None = None) -> onnx.ModelProto:
    """Runs the ONNX phases; returns the final model."""
    from compiler.onnx_io import save_model

    for index, phase in enumerate(onnx_phases(input_shapes, gating), start=1):
        with progress.step(phase.name):
            result = phase.run(model)
        model = result.model
        if explanations is not None:
            explanations.extend(result.explanations)
        if dump_dir is not None:
            save_model(model, dump_dir / f"{index:02d}-{phase.name}.onnx")
    return model
