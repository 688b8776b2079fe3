"""Speed of the event-driven simulator: synaptic operations simulated per host second.

    flock /tmp/sparsecc-bench.lock python benchmarks/neuro_simulator.py [--json PATH]

One 4096 x 4096 linear layer (50 % of the weights zero) compiled for ``neuro:seneca``
(it needs three chips), run on inputs with 50 % of the entries zero, one and eight tokens
per call. A run is the whole simulation as ``sparsecc run`` and ``profile`` do it: the
gate, the event lists, the TVM event kernel over every core, and the counting of
synaptic operations, events, packets, hops and link loads. The issue's goal is at least
5e7 synaptic operations per second on 2 cores. Medians of repeats; the weights (67 MB of
synapse tables) are larger than the last-level cache, so they come from DRAM.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TVM_NUM_THREADS", str(os.cpu_count() or 1))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

GOAL = 5e7


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--artifact", action="append", default=[],
                        help="also time one simulated run of this neuro artifact (e.g. a one-token SmolLM2-135M)")
    parser.add_argument("--json")
    args = parser.parse_args()

    import runtime
    from benchmarks.bench_kernels import matmul_model
    from compiler.driver import CompileOptions, compile_model

    rng = np.random.default_rng(0)
    k = n = args.size
    weight = (rng.standard_normal((k, n)) * (rng.random((k, n)) < 0.5)).astype(np.float32)
    results = []
    with tempfile.TemporaryDirectory() as work:
        onnx_path = Path(work) / "layer.onnx"
        onnx_path.write_bytes(matmul_model(weight))
        for rows in (1, 8):
            artifact = Path(work) / f"layer{rows}.sccx"
            compile_model(CompileOptions(str(onnx_path), str(artifact), "neuro:seneca", shapes={"x": [rows, k]}, chips=3))
            model = runtime.load(artifact)
            x = (rng.standard_normal((rows, k)) * (rng.random((rows, k)) < 0.5)).astype(np.float32)
            expected_ops = int(sum(np.count_nonzero(weight[np.nonzero(row)[0]]) for row in x))
            model.run({"x": x})
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                _, counts = model.simulate({"x": x})
                times.append(time.perf_counter() - start)
            ops = int(sum(c.synaptic_ops.sum() for c in counts))
            assert ops == expected_ops, (ops, expected_ops)
            median = statistics.median(times)
            results.append({"rows": rows, "shape": [k, n], "cores": model.manifest.target["cores_used"],
                            "synaptic_ops": ops, "median_s": median, "synaptic_ops_per_s": ops / median,
                            "threads": int(os.environ["TVM_NUM_THREADS"])})
            print(f"{rows} token(s): {ops:,} synaptic ops on {results[-1]['cores']} cores in {median * 1e3:.1f} ms "
                  f"-> {ops / median:.3g} per second (goal {GOAL:.0e}: {'met' if ops / median >= GOAL else 'not met'})")
            del model
    for path in args.artifact:
        results.append(time_artifact(path, min(args.repeats, 5)))
    if args.json:
        Path(args.json).write_text(json.dumps({"goal": GOAL, "results": results}, indent=2) + "\n")


def time_artifact(path: str, repeats: int) -> dict:
    """Host seconds of one simulated run of an artifact on its default inputs."""
    import runtime
    from targets.neuro.profile import default_inputs

    model = runtime.load(path)
    inputs = default_inputs(model.manifest)
    model.run(inputs)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        _, counts = model.simulate(inputs)
        times.append(time.perf_counter() - start)
    ops = int(sum(c.synaptic_ops.sum() for c in counts))
    median = statistics.median(times)
    print(f"{path}: {ops:,} synaptic ops on {model.manifest.target['cores_used']} cores in {median:.2f} s "
          f"-> {ops / median:.3g} per second")
    return {"artifact": Path(path).name, "cores": model.manifest.target["cores_used"], "synaptic_ops": ops,
            "median_s": median, "synaptic_ops_per_s": ops / median, "threads": int(os.environ["TVM_NUM_THREADS"])}


if __name__ == "__main__":
    main()
