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


def onnx_phases(input_shapes: dict[str, list[int]], target, gating: Gating | None = None) -> list[Phase]:
    """The graph passes every target gets, in order; ``target`` (``targets.base.Target``)
    gives the kernel costs that weight formats are chosen with."""
    costs = target.costs
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
        # Sparse weights become SparseMatMul where the target's sparse kernel is predicted
        # faster, in a format that kernel takes.
        Phase("dense_to_sparse", lambda model: dense_to_sparse(model, costs)),
        # A gate and the linear layers it feeds become one GatedMatMul per format
        # (dual-sparse where the target's dual-sparse kernel is predicted faster).
        Phase("fuse_gated_matmul", lambda model: fuse_gated_matmul(model, costs)),
    ]
    return phases


def run_onnx_phases(model: onnx.ModelProto, input_shapes: dict[str, list[int]], target, progress: Progress,
                    dump_dir: Path | None = None, explanations: list[str] | None = None,
                    gating: Gating | None = None) -> onnx.ModelProto:
    """Runs the ONNX phases for ``target``; returns the final model."""
    from compiler.onnx_io import save_model

    if explanations is not None:
        explanations.append(f"weight formats: chosen with the {target.costs.target} target's kernel costs "
                            f"({target.costs.source}).")
    for index, phase in enumerate(onnx_phases(input_shapes, target, gating), start=1):
        with progress.step(phase.name):
            result = phase.run(model)
        model = result.model
        if explanations is not None:
            explanations.extend(result.explanations)
        if dump_dir is not None:
            save_model(model, dump_dir / f"{index:02d}-{phase.name}.onnx")
    return model
