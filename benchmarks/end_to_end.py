"""SmolLM2-135M, one token through the whole model: ours (dense; 50 % pruned + 40 % gated)
against onnxruntime on the dense model, measured in one process.

    python benchmarks/end_to_end.py [--workdir DIR] [--repeats N] [--json PATH]

A forward pass over one token is the memory-bound regime of decoding (every weight read
once per token). Without a KV cache (not built yet) it has no context, so the numbers are
per-token weight traffic, not a generation benchmark. Runs alternate between the models
so drifts in the shared machine's bandwidth hit all of them alike, with a pause before
each so the previous runtime's spinning threads are idle; medians are reported.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TVM_NUM_THREADS", str(os.cpu_count() or 1))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

SETTLE_SECONDS = 0.2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="bench-e2e")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--json")
    args = parser.parse_args()

    import onnxruntime as ort

    import runtime
    from compiler.driver import CompileOptions, compile_model
    from compiler.export import ExportOptions, export
    from compiler.pipeline import sparse_onnx_dump
    from compiler.progress import Progress

    progress = Progress()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    dense_onnx, pruned_onnx = work / "dense.onnx", work / "pruned50.onnx"
    if not dense_onnx.exists():
        export(ExportOptions("smollm2-135m", str(dense_onnx), seq_len=1), progress)
    if not pruned_onnx.exists():
        export(ExportOptions("smollm2-135m", str(pruned_onnx), prune_magnitude=0.5, seq_len=1), progress)
    variants = {
        "ours dense": CompileOptions(str(dense_onnx), str(work / "dense.sccx")),
        "ours 50% weights + 40% activations": CompileOptions(
            str(pruned_onnx), str(work / "sparse.sccx"), activation_sparsity=0.4, calib="pydoc", calib_tokens=512,
            dump_dir=str(work / "dump")),
    }
    models = {}
    for name, options in variants.items():
        if not Path(options.output).exists():
            compile_model(options, progress)
        models[name] = runtime.load(options.output)

    ids = np.array([[504]], np.int64)
    session_options = ort.SessionOptions()
    session_options.intra_op_num_threads = os.cpu_count() or 1
    reference = ort.InferenceSession(str(dense_onnx), session_options, providers=["CPUExecutionProvider"])
    gated_reference = ort.InferenceSession(str(sparse_onnx_dump(work / "dump")), session_options,
                                           providers=["CPUExecutionProvider"])
    runs = {"onnxruntime dense": lambda: reference.run(None, {"input_ids": ids})}
    runs.update({name: (lambda m=m: m.run({"input_ids": ids})) for name, m in models.items()})

    errors = {
        "ours dense": float(np.abs(models["ours dense"].run({"input_ids": ids})["logits"] - runs["onnxruntime dense"]()[0]).max()),
        "ours 50% weights + 40% activations": float(np.abs(
            models["ours 50% weights + 40% activations"].run({"input_ids": ids})["logits"]
            - gated_reference.run(None, {"input_ids": ids})[0]).max()),
    }
    times = {name: [] for name in runs}
    for run in runs.values():
        run()
    for _ in range(args.repeats):
        for name, run in runs.items():
            # onnxruntime's and TVM's worker threads spin for a while after a call; on
            # two cores they would steal the next runtime's second core.
            time.sleep(SETTLE_SECONDS)
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    medians = {name: float(np.median(values)) for name, values in times.items()}
    base = medians["onnxruntime dense"]
    rows = [{"variant": name, "ms": ms * 1e3, "speedup_vs_onnxruntime": base / ms,
             "max_abs_error_vs_reference": errors.get(name)} for name, ms in medians.items()]
    print(f"\n{'variant':40} {'ms/token':>9} {'vs ORT':>7}  max |error| vs its onnxruntime reference")
    for row in rows:
        error = "" if row["max_abs_error_vs_reference"] is None else f"{row['max_abs_error_vs_reference']:.1e}"
        print(f"{row['variant']:40} {row['ms']:9.2f} {row['speedup_vs_onnxruntime']:6.2f}x  {error}")
    if args.json:
        Path(args.json).write_text(json.dumps({"results": rows, "repeats": args.repeats}, indent=2) + "\n")


if __name__ == "__main__":
    main()
