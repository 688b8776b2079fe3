"""Benchmarks the TIR dense matmul kernel against onnxruntime's MatMul and numpy.

For each weight shape ``(K, N)`` and each ``M``, the script builds
``targets.cpu.kernels.dense_matmul_func(M, K, N)`` for the host, checks it against numpy,
and times ``y = x @ W`` for three implementations in the same process:

- ``ours``: the TIR kernel on the packed weight;
- ``ort``: a one-node ONNX ``MatMul`` with ``W`` as an initializer, run by onnxruntime with
  two intra-op threads (output bound once with IOBinding, so only the run is timed);
- ``numpy``: ``np.matmul`` into a preallocated output.

The weights are cold: every implementation rotates over enough copies of the weight that
the copies together exceed ``--cold-bytes`` (1.25 GB by default, beyond the last-level
cache), so each call reads its weight from DRAM, as a decode step of a real model does.
Every call is timed on its own and the table reports the median in milliseconds.

Usage::

    python benchmarks/dense_matmul.py [--repeats N] [--quick] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

# Before tvm is imported: its thread pool otherwise uses half of the cores on x86.
os.environ.setdefault("TVM_NUM_THREADS", str(os.cpu_count()))

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
import tvm  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from targets.cpu.host import host_target  # noqa: E402
from targets.cpu.kernels import dense_matmul_func, pack_dense_weight  # noqa: E402

SHAPES = ((576, 1536), (1536, 576), (2048, 5632))
ROWS = (1, 8)
ORT_THREADS = 2
# onnxruntime 1.2x reads IR version <= 10 models; onnx writes newer ones by default.
ONNX_IR_VERSION = 8
MAX_REL_ERROR = 1e-4


def matmul_model(weight: np.ndarray) -> bytes:
    """A one-node ONNX model ``y = x @ weight`` with a symbolic number of rows."""
    k, n = weight.shape
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])],
        "matmul",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["M", n])],
        [numpy_helper.from_array(weight, "W")],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=ONNX_IR_VERSION
    )
    onnx.checker.check_model(model)
    return model.SerializeToString()


def ort_session(model: bytes) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = ORT_THREADS
    options.inter_op_num_threads = 1
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def time_calls(calls, rounds: int) -> list[float]:
    """Times each call in ``calls``, ``rounds`` times over, in milliseconds."""
    times = []
    for _ in range(rounds):
        for call in calls:
            start = time.perf_counter()
            call()
            times.append((time.perf_counter() - start) * 1e3)
    return times


def bench_shape(k: int, n: int, rows, repeats: int, cold_bytes: int, rng) -> list[dict]:
    """Benchmarks one weight shape for every ``M`` in ``rows``."""
    weight = rng.standard_normal((k, n), dtype=np.float32) / np.float32(np.sqrt(k))
    copies = max(2, -(-cold_bytes // weight.nbytes))
    device = tvm.cpu()
    packed = pack_dense_weight(weight)
    ours_weights = [tvm.runtime.tensor(packed, device) for _ in range(copies)]
    numpy_weights = [weight.copy() for _ in range(copies)]
    model = matmul_model(weight)
    sessions = [ort_session(model) for _ in range(copies)]

    results = []
    for m in rows:
        x = rng.standard_normal((m, k), dtype=np.float32)
        expected = x.astype(np.float64) @ weight.astype(np.float64)

        kernel_func = dense_matmul_func(m, k, n)
        symbol = str(kernel_func.attrs["global_symbol"])
        kernel = tvm.compile(tvm.IRModule({symbol: kernel_func}), target=host_target()).mod[
            symbol
        ]
        x_tvm = tvm.runtime.tensor(x, device)
        y_tvm = tvm.runtime.tensor(np.zeros((m, n), np.float32), device)
        kernel(x_tvm, ours_weights[0], y_tvm)
        rel_error = float(np.abs(y_tvm.numpy() - expected).max() / np.abs(expected).max())
        assert rel_error < MAX_REL_ERROR, f"M={m} K={k} N={n}: relative error {rel_error:.2e}"

        bindings = []
        y_ort = ort.OrtValue.ortvalue_from_numpy(np.zeros((m, n), np.float32))
        for session in sessions:
            binding = session.io_binding()
            binding.bind_cpu_input("x", x)
            binding.bind_ortvalue_output("y", y_ort)
            bindings.append((session, binding))
        ort_rel_error = float(
            np.abs(sessions[0].run(None, {"x": x})[0] - expected).max() / np.abs(expected).max()
        )

        y_np = np.zeros((m, n), np.float32)
        impls = {
            "ours": [lambda w=w: kernel(x_tvm, w, y_tvm) for w in ours_weights],
            "ort": [lambda s=s, b=b: s.run_with_iobinding(b) for s, b in bindings],
            "numpy": [lambda w=w: np.matmul(x, w, out=y_np) for w in numpy_weights],
        }
        times = {name: [] for name in impls}
        for name, calls in impls.items():  # warm-up: first-call costs and thread start-up
            time_calls(calls[:2], 1)
        for _ in range(repeats):  # interleaved so that drift in the host hits all alike
            for name, calls in impls.items():
                times[name] += time_calls(calls, 1)
        medians = {name: statistics.median(t) for name, t in times.items()}
        results.append(
            {
                "m": m,
                "k": k,
                "n": n,
                "weight_copies": copies,
                "calls_per_impl": len(times["ours"]),
                "ours_ms": medians["ours"],
                "ort_ms": medians["ort"],
                "numpy_ms": medians["numpy"],
                "ours_over_ort": medians["ours"] / medians["ort"],
                "ours_rel_error": rel_error,
                "ort_rel_error": ort_rel_error,
                "ours_gb_per_s": weight.nbytes / medians["ours"] / 1e6,
            }
        )
        r = results[-1]
        print(
            f"{m:>4} {k:>6} {n:>6} {r['ours_ms']:>9.4f} {r['ort_ms']:>9.4f} "
            f"{r['numpy_ms']:>9.4f} {r['ours_over_ort']:>8.3f} {r['ours_gb_per_s']:>8.1f}",
            flush=True,
        )
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", metavar="PATH", help="write the results here as JSON")
    parser.add_argument(
        "--repeats", type=int, default=5, help="passes over all weight copies (default 5)"
    )
    parser.add_argument(
        "--quick", action="store_true", help="2 passes and a 0.6 GB rotation: a smoke test"
    )
    parser.add_argument(
        "--cold-bytes",
        type=float,
        default=1.25e9,
        help="bytes of weight copies each implementation rotates over (default 1.25e9)",
    )
    args = parser.parse_args(argv)
    repeats = 2 if args.quick else args.repeats
    cold_bytes = int(0.6e9 if args.quick else args.cold_bytes)

    target = host_target()
    print(
        f"target {target}, TVM_NUM_THREADS={os.environ['TVM_NUM_THREADS']}, "
        f"ORT {ort.__version__} ({ORT_THREADS} threads), cold rotation {cold_bytes / 1e9:.2f} GB"
    )
    print(
        f"{'M':>4} {'K':>6} {'N':>6} {'ours ms':>9} {'ort ms':>9} {'numpy ms':>9} "
        f"{'ours/ort':>8} {'ours GB/s':>8}"
    )
    rng = np.random.default_rng(0)
    results = []
    for k, n in SHAPES:
        results += bench_shape(k, n, ROWS, repeats, cold_bytes, rng)

    if args.json:
        report = {
            "target": str(target),
            "machine": platform.processor() or platform.machine(),
            "tvm": tvm.__version__,
            "onnxruntime": ort.__version__,
            "tvm_num_threads": int(os.environ["TVM_NUM_THREADS"]),
            "ort_threads": ORT_THREADS,
            "cold_bytes": cold_bytes,
            "repeats": repeats,
            "results": results,
        }
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
