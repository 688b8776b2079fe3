"""The driver: the Python API behind every CLI verb.

Each function takes a frozen options dataclass (or plain arguments), does the work, and
returns a summary dict; the CLI only parses options and prints. User mistakes raise
``SparseccError`` with one sentence.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import onnx

from compiler import __version__
from compiler.build import (CompileOptions, artifact_bytes, build_graph, dense_weight_bytes, gating_for, input_signature,
                            weight_size)
from compiler.onnx_io import load_model
from compiler.progress import SILENT, Progress
from compiler.output_file import atomic_output, check_output_file, check_parent_folders
from runtime.artifact import Manifest, WeightSpec, check_replaceable, read_manifest, staging_dir, write_artifact
from runtime.errors import WRITE_ERRNOS, SparseccError, cannot_write


def parse_shape(text: str) -> tuple[str, list[int]]:
    """Parses ``NAME=D0,D1,...`` (as given to ``--shape``)."""
    name, sep, dims = text.partition("=")
    try:
        shape = [int(d) for d in dims.split(",")]
    except ValueError:
        shape = []
    if not sep or not name or not shape or any(d < 1 for d in shape):
        raise SparseccError(f"--shape {text!r} is not of the form NAME=D0,D1,... with positive sizes.")
    if any(d > MAX_DIMENSION for d in shape):
        raise SparseccError(f"--shape {text!r} has a dimension above {MAX_DIMENSION} (2^31 - 1), the most TVM can index.")
    return name, shape


# TVM indexes a dimension with int32.
MAX_DIMENSION = 2**31 - 1


def compile_model(options: CompileOptions, progress: Progress = SILENT) -> dict:
    """Compiles an ONNX model into an artifact folder; returns a summary.

    A decode step exported with ``sparsecc export --decode`` is compiled together with
    its prefill step into one artifact (``compiler.decode_build``). Nothing is written at
    ``options.output`` unless the whole build succeeds.

    Raises:
        SparseccError: for any user mistake, an ``-o`` that may not be replaced (checked
            before any work), and a write the system refuses (a full disk, a read-only
            folder), which leaves the old artifact, if any, in place.
    """
    check_parent_folders(Path(options.output))
    check_replaceable(Path(options.output))
    try:
        return _compile(options, progress)
    except OSError as exc:
        if exc.errno not in WRITE_ERRNOS:
            raise
        raise cannot_write(options.output, exc) from None
    except RuntimeError as exc:  # TVM's C compiler call reports a full disk in its output
        if "No space left on device" not in str(exc):
            raise
        raise cannot_write(options.output, OSError(errno.ENOSPC, "No space left on device")) from None


def _compile(options: CompileOptions, progress: Progress) -> dict:
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
                "weight_dtype": options.weight_dtype, "weight_dtype_for": dict(options.weight_dtype_for),
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
    from passes.base import embedding_rows

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
    with atomic_output(path) as handle, zipfile.ZipFile(handle, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
        for name, array in outputs.items():
            with archive.open(f"{names[name]}.npy", "w", force_zip64=True) as entry:
                np.lib.format.write_array(entry, np.asanyarray(array), allow_pickle=False)
    return names


def run(artifact: str, inputs: dict[str, np.ndarray], output: str | None = None) -> dict[str, np.ndarray]:
    """Runs an artifact on arrays (the Python API is ``runtime.load(path).run``); an
    ``output`` file to be written later is checked first, before the run."""
    import runtime

    if output is not None:
        check_output_file(output)
    return runtime.load(artifact).run(inputs)


def manifest_json(manifest: Manifest) -> str:
    return json.dumps(manifest.to_dict(), indent=2)
