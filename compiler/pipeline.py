"""The compile pipeline, as a flat list of phases.

Each phase is ModelProto in, ModelProto out (``passes.PassResult``): the graph passes every
target gets, then the target's ``legalize``, whose output is what the TVM import reads.
With a dump folder the model is saved after every phase so a user can look at what each
one did.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
from onnx import numpy_helper

from compiler.progress import Progress
from passes.analyze_sparsity import SparsityReport, analyze_sparsity
from passes.base import PassResult
from passes.dense_to_sparse import dense_to_sparse
from passes.drop_dead_neurons import drop_dead_neurons
from passes.fold_pruning_masks import fold_pruning_masks
from passes.fuse_gated_matmul import fuse_gated_matmul
from passes.guard_gather_indices import guard_gather_indices, index_ranges
from passes.insert_activation_gates import gated_inputs, insert_activation_gates
from passes.quantize_weights import quantize_weights
from passes.simplify_shapes import simplify_shapes
from runtime.errors import SparseccError

# The target's phase; its dump holds the target's private ops, which onnxruntime cannot run.
LEGALIZE = "legalize"


@dataclass(frozen=True)
class Phase:
    name: str
    run: Callable[[onnx.ModelProto], PassResult]


@dataclass(frozen=True)
class Gating:
    """How activation gates are set: thresholds per tensor, or a way to calibrate them."""

    thresholds: dict[str, float] | None = None
    calibrate: Callable[[onnx.ModelProto], tuple[dict[str, float], dict[str, float]]] | None = None


@dataclass
class Legalized(PassResult):
    """The legalize phase's outcome.

    Attributes:
        weights: the weights lifted out of the graph as (graph input name, array, source
            name), in graph-input order; the compiled library takes them after the inputs.
        report: the sparsity of the linear layers as legalize received them: the last
            graph in which they are ONNX ops, which the manifest's summary describes.
    """

    weights: list[tuple[str, np.ndarray, str]] = field(default_factory=list)
    report: SparsityReport | None = None
    #: valid ``[low, high)`` of the graph inputs that index constant tables
    #: (``passes.guard_gather_indices.index_ranges``), as legalize received the graph.
    input_ranges: dict[str, list[int]] = field(default_factory=dict)

    def self_contained(self) -> onnx.ModelProto:
        """A copy of the model whose lifted weights are also the initializers of their graph
        inputs, so that its dump holds every array the compiled library reads."""
        model = onnx.ModelProto()
        model.CopyFrom(self.model)
        model.graph.initializer.extend(numpy_helper.from_array(array, name) for name, array, _ in self.weights)
        return model


def _legalize_phase(target) -> Callable[[onnx.ModelProto], Legalized]:
    def run(model: onnx.ModelProto) -> Legalized:
        # Taken first: legalize rewrites the model in place, and its linear layers become
        # the target's ops, which the analysis does not read.
        report, ranges = analyze_sparsity(model), index_ranges(model)
        model, weights, explanations = target.legalize(model)
        return Legalized(model, True, explanations, weights, report, ranges)

    return run


def _gate_phase(gating: Gating) -> Callable[[onnx.ModelProto], PassResult]:
    def run(model: onnx.ModelProto) -> PassResult:
        if gating.thresholds is not None:
            gateable = gated_inputs(model)
            unknown = sorted(set(gating.thresholds) - set(gateable))
            if unknown:
                raise SparseccError(f"--thresholds names {', '.join(map(repr, unknown[:3]))}"
                                    f"{f' and {len(unknown) - 3} more' if len(unknown) > 3 else ''}, not the input of a "
                                    f"linear layer with a constant weight (those are, e.g., {', '.join(sorted(gateable)[:3])}).")
            return insert_activation_gates(model, gating.thresholds)
        thresholds, measured = gating.calibrate(model)
        return insert_activation_gates(model, thresholds, measured)

    return run


@dataclass(frozen=True)
class Quantization:
    """The weights' value dtype (``formats.quant.WEIGHT_DTYPES``) and per-layer overrides
    (weight or node name -> dtype)."""

    dtype: str = "fp32"
    overrides: dict[str, str] = field(default_factory=dict)

    @property
    def active(self) -> bool:
        return self.dtype != "fp32" or any(value != "fp32" for value in self.overrides.values())


def onnx_phases(input_shapes: dict[str, list[int]], target, gating: Gating | None = None,
                quantization: Quantization | None = None) -> list[Phase]:
    """The phases, in order: the graph passes every target gets, then ``target``'s
    legalisation; ``target`` (``targets.base.Target``) also gives the kernel costs that
    weight formats are chosen with."""
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
    if quantization is not None and quantization.active:
        # Weight values in int8 / int4 groups, as standard DequantizeLinear; the layers
        # quantized stay dense (their kernels read fewer bytes than any float32 format).
        phases.append(Phase("quantize_weights",
                            lambda model: quantize_weights(model, quantization.dtype, quantization.overrides)))
    phases += [
        # Sparse weights become SparseMatMul where the target's sparse kernel is predicted
        # faster, in a format that kernel takes.
        Phase("dense_to_sparse", lambda model: dense_to_sparse(model, costs)),
        # A gate and the linear layers it feeds become one GatedMatMul per format
        # (dual-sparse where the target's dual-sparse kernel is predicted faster).
        Phase("fuse_gated_matmul", lambda model: fuse_gated_matmul(model, costs)),
        # Table lookups stay in their tables: input-fed indices get a range the runtime
        # checks, computed ones are wrapped into the table.
        Phase("guard_gather_indices", guard_gather_indices),
        # The target's own ops: linear layers become its dense, sparse, gated and
        # dual-sparse kernels, and their weights leave the graph (targets/legalize.py).
        Phase(LEGALIZE, _legalize_phase(target)),
    ]
    return phases


def run_onnx_phases(model: onnx.ModelProto, input_shapes: dict[str, list[int]], target, progress: Progress,
                    dump_dir: Path | None = None, explanations: list[str] | None = None,
                    gating: Gating | None = None, quantization: Quantization | None = None) -> Legalized:
    """Runs the phases for ``target``; returns the last one's (legalize's) result."""
    from compiler.onnx_io import save_model

    if explanations is not None:
        explanations.append(f"weight formats: chosen with the {target.costs.target} target's kernel costs "
                            f"({target.costs.source}).")
    for index, phase in enumerate(onnx_phases(input_shapes, target, gating, quantization), start=1):
        with progress.step(phase.name):
            result = phase.run(model)
        model = result.model
        if explanations is not None:
            explanations.extend(result.explanations)
        if dump_dir is not None:
            dumped = result.self_contained() if isinstance(result, Legalized) else model
            save_model(dumped, dump_dir / f"{index:02d}-{phase.name}.onnx")
    return result


def sparse_onnx_dump(dump_dir: Path) -> Path:
    """The dump of the last phase before legalize: the model in standard and ``ai.sparsecc``
    ops, which onnxruntime runs through the reference functions (``sparsecc check``)."""
    dumps = sorted(path for path in Path(dump_dir).glob("[0-9][0-9]-*.onnx") if not path.name.endswith(f"-{LEGALIZE}.onnx"))
    return dumps[-1]
