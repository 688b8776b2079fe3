"""One graph through the passes and a target: what ``compile_model`` and ``compile_decoder`` share.

``compiler.driver`` compiles one graph into an artifact; ``compiler.decode_build`` compiles
a decoder's two graphs into one. Both read the compile options, the model's signature and
its dense size the same way and build each graph with ``build_graph``; those pieces live
here, below both, so neither imports the other's module for them.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from compiler.pipeline import Gating, Quantization, run_onnx_phases
from compiler.progress import Progress
from runtime.artifact import TensorSpec
from runtime.errors import SparseccError
from runtime.memory import check_fits

# The ONNX element types a compiled model can take as inputs.
ONNX_DTYPES = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.INT64: "int64", onnx.TensorProto.INT32: "int32",
               onnx.TensorProto.FLOAT16: "float16", onnx.TensorProto.BOOL: "bool"}


@dataclass(frozen=True)
class CompileOptions:
    """What ``sparsecc compile`` does.

    Attributes:
        model: path of the ONNX model.
        output: the artifact folder to write (``NAME.sccx``).
        target: ``cpu``, ``cuda`` or ``neuro:<chip>``.
        shapes: sizes for symbolic input dimensions, ``{input name: [dims]}``.
        dump_dir: where to write the model after every phase, or None.
        explain: collect one line per decision the passes and the target made.
        activation_sparsity: target fraction of zeros for a magnitude gate on every
            linear input, calibrated on ``calib`` (None: no gates).
        calib: calibration data: ``pydoc``, a text file, or an ``.npz`` of inputs.
        calib_tokens: tokens of text to calibrate on.
        thresholds: a JSON file ``{tensor name: threshold}`` giving the gates directly.
        chips: how many chips a ``neuro:<chip>`` target joins.
        weight_dtype: the linear layers' weight values (``formats.quant.WEIGHT_DTYPES``).
        weight_dtype_for: per-layer overrides, weight or node name -> dtype.
    """

    model: str
    output: str
    target: str = "cpu"
    shapes: dict = field(default_factory=dict)
    dump_dir: str | None = None
    explain: bool = False
    activation_sparsity: float | None = None
    calib: str | None = None
    calib_tokens: int = 2048
    thresholds: str | None = None
    chips: int = 1
    weight_dtype: str = "fp32"
    weight_dtype_for: dict = field(default_factory=dict)

    @property
    def quantization(self) -> Quantization:
        return Quantization(self.weight_dtype, dict(self.weight_dtype_for))


def gating_for(options: CompileOptions, input_shapes: dict[str, list[int]], progress: Progress):
    """The pipeline's activation-gate settings from the options (None: no gates)."""
    if options.thresholds:
        if options.activation_sparsity is not None:
            raise SparseccError("give either --thresholds or --activation-sparsity, not both.")
        try:
            thresholds = json.loads(Path(options.thresholds).read_text())
        except FileNotFoundError:
            raise SparseccError(f"{options.thresholds}: no such file.") from None
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise SparseccError(f"{options.thresholds} is not a JSON file of {{tensor name: threshold}}.") from None
        if not isinstance(thresholds, dict):
            raise SparseccError(f"{options.thresholds} must map tensor names to numbers.")
        for name, value in thresholds.items():
            # JSON's true is an int to Python, and json reads NaN and Infinity: a NaN
            # threshold would zero every activation (|x| > nan is always false).
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise SparseccError(f"{options.thresholds}: the threshold of {name!r} is {json.dumps(value)}, not a "
                                    "finite number of at least 0.")
        return Gating(thresholds={str(k): float(v) for k, v in thresholds.items()})
    if options.activation_sparsity is None:
        if options.calib:
            raise SparseccError("--calib needs --activation-sparsity.")
        return None
    if not 0.0 <= options.activation_sparsity < 1.0:
        raise SparseccError(f"--activation-sparsity must be in [0, 1), not {options.activation_sparsity}.")
    if not options.calib:
        raise SparseccError("--activation-sparsity needs calibration data: --calib pydoc, a text file or an .npz of inputs.")

    def calibrate(model: onnx.ModelProto):
        from sparsify.calibration import calibration_feeds, gate_thresholds

        feeds = calibration_feeds(model, options.calib, input_shapes, options.calib_tokens)
        return gate_thresholds(model, feeds, options.activation_sparsity, progress, f"{len(feeds)} batches of {options.calib}")

    return Gating(calibrate=calibrate)


def input_signature(model: onnx.ModelProto, overrides: dict[str, list[int]]) -> list[TensorSpec]:
    """The model's real inputs (not initializers) with concrete shapes."""
    initializers = {init.name for init in model.graph.initializer}
    inputs = [value for value in model.graph.input if value.name not in initializers]
    known = {value.name for value in inputs}
    for name in overrides:
        if name not in known:
            raise SparseccError(f"--shape names {name!r}, but the model's inputs are {', '.join(sorted(known))}.")
    specs = []
    for value in inputs:
        tensor_type = value.type.tensor_type
        dtype = ONNX_DTYPES.get(tensor_type.elem_type)
        if dtype is None:
            raise SparseccError(f"input {value.name!r} has an element type sparsecc cannot compile ({onnx.TensorProto.DataType.Name(tensor_type.elem_type)}).")
        dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tensor_type.shape.dim]
        if value.name in overrides:
            shape = overrides[value.name]
            if len(shape) != len(dims) or any(isinstance(d, int) and d != s for d, s in zip(dims, shape)):
                raise SparseccError(f"--shape {value.name}={','.join(map(str, shape))} does not fit the model's shape {dims}.")
        else:
            symbolic = [d for d in dims if not isinstance(d, int)]
            if symbolic:
                raise SparseccError(
                    f"input {value.name!r} has symbolic dimensions {symbolic}; give sizes with "
                    f"--shape {value.name}={','.join(str(d) if isinstance(d, int) else 'N' for d in dims)}."
                )
            shape = dims
        if any(size < 1 for size in shape):
            raise SparseccError(f"input {value.name!r} has shape {list(shape)}; every dimension must be at least 1.")
        check_fits(math.prod(shape) * np.dtype(dtype).itemsize, f"input {value.name!r} of shape {list(shape)}")
        specs.append(TensorSpec(value.name, tuple(shape), dtype))
    return specs


def output_signature(model: onnx.ModelProto) -> list[TensorSpec]:
    specs = []
    for value in model.graph.output:
        tensor_type = value.type.tensor_type
        dims = [d.dim_value for d in tensor_type.shape.dim]
        specs.append(TensorSpec(value.name, tuple(dims), ONNX_DTYPES.get(tensor_type.elem_type, "float32")))
    return specs


def dense_weight_bytes(model: onnx.ModelProto) -> int:
    """Bytes of the model's weights stored dense in fp32: every floating-point initializer
    once, pruning masks not counted (they fold into their weights). Reads the model only."""
    from passes.base import Graph
    from passes.fold_pruning_masks import check

    graph = Graph(model.graph)
    masks = set()
    for node in model.graph.node:
        if node.op_type == "Mul":
            found = check(node, graph)
            if not isinstance(found, str):
                masks.add(found[1])
    return sum(int(np.prod(init.dims)) * 4 for init in model.graph.initializer
               if init.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16) and init.name not in masks)


def weight_size(stored_bytes: int, dense_bytes: int) -> dict:
    """The manifest's size fields: stored weight bytes against the dense fp32 ones."""
    return {"weight_bytes": stored_bytes, "dense_weight_bytes": dense_bytes,
            "weights_vs_dense": stored_bytes / dense_bytes if dense_bytes else 1.0}


def build_graph(options: CompileOptions, model: onnx.ModelProto, inputs: list[TensorSpec], target, gating,
                staging: Path, dump_dir: Path | None, explanations: list[str], progress: Progress) -> dict:
    """Runs the passes on one graph and builds it into ``staging`` (library and weights).

    Returns ``{"built": target.build's entries, "report": the sparsity report, "outputs":
    the output signature, "input_ranges": the valid ranges of inputs that index tables}``.
    """
    missing = target.unsupported_ops(model)
    if missing:
        raise SparseccError(f"{options.model} uses ops sparsecc cannot compile: {', '.join(missing)}.")
    if dump_dir is not None:
        dump_dir.mkdir(parents=True, exist_ok=True)
    shapes = {spec.name: list(spec.shape) for spec in inputs}
    legalized = run_onnx_phases(model, shapes, target, progress, dump_dir, explanations, gating,
                                options.quantization)

    def dump(name: str, text: str) -> None:
        if dump_dir is not None:
            (dump_dir / name).write_text(text)

    with progress.step("importing into TVM Relax"):
        lowered = target.lower(legalized.model, legalized.weights, shapes, dump)
    with progress.step("building with TVM"):
        built = target.build(lowered, staging, dump)
    return {"built": built, "report": legalized.report, "outputs": output_signature(legalized.model),
            "input_ranges": legalized.input_ranges}


def artifact_bytes(path: str | os.PathLike) -> int:
    return sum(entry.stat().st_size for entry in Path(path).iterdir() if entry.is_file())

