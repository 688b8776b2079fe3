"""The driver: the Python API behind every CLI verb.

Each function takes a frozen options dataclass (or plain arguments), does the work, and
returns a summary dict; the CLI only parses options and prints. User mistakes raise
``SparseccError`` with one sentence.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from compiler import __version__
from compiler.onnx_io import load_model
from compiler.pipeline import run_onnx_phases
from compiler.progress import SILENT, Progress
from runtime.artifact import Manifest, TensorSpec, WeightSpec, read_manifest, staging_dir, write_artifact
from runtime.errors import SparseccError

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


def gating_for(options: CompileOptions, input_shapes: dict[str, list[int]], progress: Progress):
    """The pipeline's activation-gate settings from the options (None: no gates)."""
    from compiler.pipeline import Gating

    if options.thresholds:
        if options.activation_sparsity is not None:
            raise SparseccError("give either --thresholds or --activation-sparsity, not both.")
        try:
            thresholds = json.loads(Path(options.thresholds).read_text())
        except FileNotFoundError:
            raise SparseccError(f"{options.thresholds}: no such file.") from None
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise SparseccError(f"{options.thresholds} is not a JSON file of {{tensor name: threshold}}.") from None
        if not isinstance(thresholds, dict) or not all(isinstance(v, (int, float)) for v in thresholds.values()):
            raise SparseccError(f"{options.thresholds} must map tensor names to numbers.")
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
        from compiler.calibration import calibration_feeds
        from passes.insert_activation_gates import calibrate_thresholds, gated_inputs

        feeds = calibration_feeds(model, options.calib, input_shapes, options.calib_tokens)
        progress(f"calibrating {len(gated_inputs(model))} gates on {len(feeds)} batches of {options.calib}")
        return calibrate_thresholds(model, sorted(gated_inputs(model)), feeds, options.activation_sparsity)

    return Gating(calibrate=calibrate)


def parse_shape(text: str) -> tuple[str, list[int]]:
    """Parses ``NAME=D0,D1,...`` (as given to ``--shape``)."""
    name, sep, dims = text.partition("=")
    try:
        shape = [int(d) for d in dims.split(",")]
    except ValueError:
        shape = []
    if not sep or not name or not shape or any(d < 1 for d in shape):
        raise SparseccError(f"--shape {text!r} is not of the form NAME=D0,D1,... with positive sizes.")
    return name, shape


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
        specs.append(TensorSpec(value.name, tuple(shape), dtype))
    return specs


def output_signature(model: onnx.ModelProto) -> list[TensorSpec]:
    specs = []
    for value in model.graph.output:
        tensor_type = value.type.tensor_type
        dims = [d.dim_value for d in tensor_type.shape.dim]
        specs.append(TensorSpec(value.name, tuple(dims), ONNX_DTYPES.get(tensor_type.elem_type, "float32")))
    return specs


def compile_model(options: CompileOptions, progress: Progress = SILENT) -> dict:
    """Compiles an ONNX model into an artifact folder; returns a summary.

    A decode step exported with ``sparsecc export --decode`` is compiled together with
    its prefill step into one artifact (``compiler.decode_build``). Nothing is written at
    ``options.output`` unless the whole build succeeds.
    """
    from compiler.decode_export import decoding_metadata
    from targets import get_target

    target = get_target(options.target, options.chips)
    start = time.perf_counter()
    with progress.step(f"loading {options.model}"):
        model = load_model(options.model)
    if decoding_metadata(model) is not None:
        from compiler.decode_build import compile_decoder

        return compile_decoder(options, model, target, progress)
    inputs = input_signature(model, options.shapes)
    dense_bytes = dense_weight_bytes(model)
    dump_dir = Path(options.dump_dir) if options.dump_dir else None
    explanations: list[str] = []
    gating = gating_for(options, {spec.name: list(spec.shape) for spec in inputs}, progress)
    staging = staging_dir(options.output)
    try:
        graph = build_graph(options, model, inputs, target, gating, staging, dump_dir, explanations, progress)
        manifest = Manifest(
            sparsecc_version=__version__,
            target=graph["built"]["target"],
            inputs=inputs,
            outputs=graph["outputs"],
            weights=[WeightSpec.from_dict(entry) for entry in graph["built"]["weights"]],
            files={},
            library=graph["built"]["library"],
            weights_file=graph["built"]["weights_file"],
            summary={
                "source": os.path.abspath(options.model),
                "linear_layers": len(graph["report"].layers),
                "weight_sparsity": graph["report"].sparsity,
                "activation_sparsity_target": options.activation_sparsity,
                "compile_seconds": time.perf_counter() - start,
                **weight_size(sum(entry["nbytes"] for entry in graph["built"]["weights"]), dense_bytes),
            },
            input_ranges=graph["input_ranges"],
        )
        write_artifact(options.output, manifest, staging)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return {
        "artifact": str(options.output),
        "seconds": time.perf_counter() - start,
        "weight_sparsity": graph["report"].sparsity,
        "artifact_bytes": artifact_bytes(options.output),
        "explanations": explanations if options.explain else [],
    }


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
    from passes.analyze_sparsity import analyze_sparsity
    from passes.guard_gather_indices import index_ranges

    missing = target.unsupported_ops(model)
    if missing:
        raise SparseccError(f"{options.model} uses ops sparsecc cannot compile: {', '.join(missing)}.")
    if dump_dir is not None:
        dump_dir.mkdir(parents=True, exist_ok=True)
    shapes = {spec.name: list(spec.shape) for spec in inputs}
    model = run_onnx_phases(model, shapes, progress, dump_dir, explanations, gating)
    report = analyze_sparsity(model)
    outputs = output_signature(model)
    ranges = index_ranges(model)

    def dump(name: str, text: str) -> None:
        if dump_dir is not None:
            (dump_dir / name).write_text(text)

    with progress.step(f"legalizing for {options.target}"):
        model, weights, target_notes = target.legalize(model)
    explanations.extend(target_notes)
    with progress.step("importing into TVM Relax"):
        lowered = target.lower(model, weights, shapes, dump)
    with progress.step("building with TVM"):
        built = target.build(lowered, staging, dump)
    return {"built": built, "report": report, "outputs": outputs, "input_ranges": ranges}


def artifact_bytes(path: str | os.PathLike) -> int:
    return sum(entry.stat().st_size for entry in Path(path).iterdir() if entry.is_file())


def inspect(path: str) -> dict:
    """Sparsity of an ONNX model's linear layers, or an artifact's manifest summary."""
    from passes.analyze_sparsity import analyze_sparsity

    if Path(path).is_dir():
        manifest = read_manifest(path)
        return {"kind": "artifact", "path": path, "manifest": manifest.to_dict(), "bytes": artifact_bytes(path)}
    report = analyze_sparsity(load_model(path))
    return {"kind": "onnx", "path": path, **report.to_dict()}


def random_inputs(model: onnx.ModelProto, seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs of the model's static shapes: token ids below the embedding size for integer
    inputs, standard normal values for floating-point ones."""
    from compiler.calibration import embedding_rows

    rng = np.random.default_rng(seed)
    vocab = embedding_rows(model) or 100
    feeds = {}
    for spec in input_signature(model, {}):
        if spec.dtype.startswith("int"):
            feeds[spec.name] = rng.integers(0, vocab, size=spec.shape).astype(spec.dtype)
        else:
            feeds[spec.name] = rng.standard_normal(spec.shape).astype(spec.dtype)
    return feeds


def check(sparse: str, dense: str, inputs: dict[str, np.ndarray] | None = None, atol: float | None = None) -> dict:
    """Runs two ONNX models in onnxruntime on the same inputs and compares their outputs.

    ``sparse`` may use ``ai.sparsecc`` ops (their reference functions run); ``dense`` is
    the original. Returns the largest absolute and relative differences per output, the
    top-1 agreement for outputs with a class axis, and ``ok`` against ``atol``.
    """
    import onnxruntime as ort

    sparse_model, dense_model = load_model(sparse), load_model(dense)
    feeds = inputs or random_inputs(dense_model)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    results = []
    try:
        sessions = [ort.InferenceSession(m.SerializeToString(), options, providers=["CPUExecutionProvider"])
                    for m in (sparse_model, dense_model)]
        outputs = [session.run(None, feeds) for session in sessions]
    except Exception as exc:
        raise SparseccError(f"onnxruntime cannot run the two models on the same inputs ({str(exc).splitlines()[0][:200]}).") from None
    for spec, ours, reference in zip(dense_model.graph.output, *outputs):
        if ours.shape != reference.shape:
            raise SparseccError(f"output {spec.name!r} has shape {list(ours.shape)} in {sparse} but {list(reference.shape)} in {dense}.")
        difference = float(np.abs(ours.astype(np.float64) - reference).max()) if ours.size else 0.0
        scale = float(np.abs(reference).max()) if reference.size else 0.0
        entry = {"output": spec.name, "max_abs_diff": difference, "max_relative_diff": difference / scale if scale else difference}
        if ours.ndim >= 2 and ours.shape[-1] > 1 and np.issubdtype(ours.dtype, np.floating):
            entry["top1_agreement"] = float((ours.argmax(-1) == reference.argmax(-1)).mean())
        results.append(entry)
    ok = atol is None or all(entry["max_abs_diff"] <= atol for entry in results)
    return {"sparse": sparse, "dense": dense, "outputs": results, "atol": atol, "ok": ok}


def load_inputs(specs: list[str]) -> dict[str, np.ndarray]:
    """Reads ``NAME=FILE.npy`` pairs into arrays."""
    inputs = {}
    for text in specs:
        name, sep, file = text.partition("=")
        if not sep or not name or not file:
            raise SparseccError(f"--input {text!r} is not of the form NAME=FILE.npy.")
        if not os.path.isfile(file):
            raise SparseccError(f"{file}: no such file.")
        try:
            inputs[name] = np.load(file, allow_pickle=False)
        except Exception as exc:
            raise SparseccError(f"{file} is not a .npy array file ({exc.__class__.__name__}).") from None
        if not isinstance(inputs[name], np.ndarray):
            raise SparseccError(f"{file} holds several arrays; give one .npy file per input.")
    return inputs


def npz_names(names) -> dict[str, str]:
    """Each output name -> its entry in an ``.npz``: a plain file name (characters other
    than letters, digits, ``_``, ``-`` and ``.`` become ``_``, a leading dot too), made
    unique with ``_2``, ``_3``... An output named ``../../evil`` cannot become an entry
    that unpacks outside a folder."""
    import re

    chosen: dict[str, str] = {}
    taken = set(names)  # a name that is already safe keeps it; a renamed one avoids it
    for name in names:
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", name)
        safe = "_" + safe[1:] if safe.startswith(".") else safe or "_"
        if safe != name:
            base, count = safe, 1
            while safe in taken or safe in chosen.values():
                count += 1
                safe = f"{base}_{count}"
            taken.add(safe)
        chosen[name] = safe
    return chosen


def save_outputs(outputs: dict[str, np.ndarray], path: str) -> dict[str, str]:
    """Writes outputs to an .npz file atomically; returns each output's entry name
    (``npz_names``). The zip is written here, not by ``np.savez``, whose own parameters
    (``file``, ``allow_pickle``) would swallow outputs of those names."""
    import zipfile

    names = npz_names(list(outputs))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.partial.npz")
    try:
        with zipfile.ZipFile(temporary, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
            for name, array in outputs.items():
                with archive.open(f"{names[name]}.npy", "w", force_zip64=True) as entry:
                    np.lib.format.write_array(entry, np.asanyarray(array), allow_pickle=False)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return names


def run(artifact: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Runs an artifact on arrays (the Python API is ``runtime.load(path).run``)."""
    import runtime

    return runtime.load(artifact).run(inputs)


def manifest_json(manifest: Manifest) -> str:
    return json.dumps(manifest.to_dict(), indent=2)
