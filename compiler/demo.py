"""``sparsecc demo``: the whole path on a real trained model, checked against onnxruntime."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import click
import numpy as np

from compiler.progress import Progress


@dataclass(frozen=True)
class DemoOptions:
    workdir: str = "sparsecc-demo"
    prune: float = 0.5
    seq_len: int = 64
    model: str = "smollm2-135m"
    repeats: int = 5


def _median_seconds(function, repeats: int) -> float:
    function()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def _perplexity(logits: np.ndarray, ids: np.ndarray) -> float:
    logits = logits[0, :-1].astype(np.float64)
    targets = ids[0, 1:]
    shifted = logits - logits.max(axis=-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    return float(np.exp(-log_probs[np.arange(len(targets)), targets].mean()))


def _file_bytes(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.iterdir() if p.is_file())
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def run_demo(options: DemoOptions) -> dict:
    """Exports, prunes, compiles, runs and checks; prints a table and returns the figures."""
    import onnxruntime as ort

    import runtime
    from compiler import driver
    from runtime.corpus import pydoc_text
    from compiler.export import ExportOptions, export, load_tokenizer

    progress = Progress()
    workdir = Path(options.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    onnx_path = workdir / f"{options.model}-pruned{round(options.prune * 100)}.onnx"
    artifact_path = workdir / f"{options.model}-pruned{round(options.prune * 100)}.sccx"
    total_start = time.perf_counter()

    with progress.step(f"exporting {options.model} with {options.prune:.0%} magnitude pruning"):
        export(ExportOptions(options.model, str(onnx_path), options.prune, 1, options.seq_len), progress)

    with progress.step("tokenizing the built-in corpus (pydoc_data.topics)"):
        tokenizer = load_tokenizer(options.model, progress)
        if tokenizer is not None:
            ids = tokenizer(pydoc_text()[:20000], return_tensors="np")["input_ids"][:, : options.seq_len].astype(np.int64)
        else:
            ids = np.random.default_rng(0).integers(0, 512, size=(1, options.seq_len)).astype(np.int64)

    report = driver.inspect(str(onnx_path))
    compile_start = time.perf_counter()
    driver.compile_model(driver.CompileOptions(str(onnx_path), str(artifact_path), "cpu"), progress)
    compile_seconds = time.perf_counter() - compile_start

    with progress.step("running the compiled model and onnxruntime on the same text"):
        model = runtime.load(artifact_path)
        ours = model.run({"input_ids": ids})["logits"]
        session_options = ort.SessionOptions()
        session_options.intra_op_num_threads = os.cpu_count() or 1
        session = ort.InferenceSession(str(onnx_path), session_options, providers=["CPUExecutionProvider"])
        reference = session.run(["logits"], {"input_ids": ids})[0]
        ours_seconds = _median_seconds(lambda: model.run({"input_ids": ids}), options.repeats)
        ort_seconds = _median_seconds(lambda: session.run(["logits"], {"input_ids": ids}), options.repeats)

    max_error = float(np.abs(ours - reference).max())
    relative_error = max_error / float(np.abs(reference).max())
    top1 = float((ours.argmax(-1) == reference.argmax(-1)).mean())
    figures = {
        "onnx_bytes": _file_bytes(onnx_path),
        "artifact_bytes": _file_bytes(artifact_path),
        "weight_sparsity": report["totals"]["sparsity"],
        "compile_seconds": compile_seconds,
        "max_abs_error": max_error,
        "relative_error": relative_error,
        "top1_agreement": top1,
        "perplexity_ours": _perplexity(ours, ids),
        "perplexity_onnxruntime": _perplexity(reference, ids),
        "run_seconds_ours": ours_seconds,
        "run_seconds_onnxruntime": ort_seconds,
        "total_seconds": time.perf_counter() - total_start,
    }
    rows = [
        ("model", f"{options.model}, {ids.shape[1]} tokens of pydoc text"),
        ("ONNX (with masks)", f"{figures['onnx_bytes'] / 1e6:.1f} MB"),
        ("artifact", f"{figures['artifact_bytes'] / 1e6:.1f} MB"),
        ("weight sparsity, all linear layers", f"{figures['weight_sparsity']:.1%}"),
        ("compile time", f"{compile_seconds:.1f} s"),
        ("max |ours - onnxruntime|", f"{max_error:.2e} (relative {relative_error:.1e})"),
        ("top-1 token agreement", f"{top1:.1%}"),
        ("perplexity ours / onnxruntime", f"{figures['perplexity_ours']:.2f} / {figures['perplexity_onnxruntime']:.2f}"),
        ("forward pass ours", f"{ours_seconds * 1e3:.1f} ms (median of {options.repeats})"),
        ("forward pass onnxruntime", f"{ort_seconds * 1e3:.1f} ms (ours runs at {ort_seconds / ours_seconds:.2f}x its speed)"),
        ("total demo time", f"{figures['total_seconds']:.0f} s"),
    ]
    width = max(len(name) for name, _ in rows)
    click.echo("")
    click.echo(f"sparsecc demo: {options.model} pruned to {options.prune:.0%}, compiled for this CPU")
    for name, value in rows:
        click.echo(f"  {name:<{width}}  {value}")
    click.echo(f"  artifact: {artifact_path}")
    return figures
