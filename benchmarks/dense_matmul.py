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
The implementations take turns, one pass over their copies each, ``--repeats`` times; every
call is timed on its own and the table reports the median in milliseconds.

The numbers are only meaningful on an otherwise idle machine: with two cores, any other
busy process halves the bandwidth and wrecks the libraries' thread synchronisation. The
``others`` column gives the cores that other processes used, on average, while a row was
timed (from ``/proc/stat``); anything above about 0.1 means the row should be run again.

Usage::

    python benchmarks/dense_matmul.py [--repeats N] [--quick] [--rows 1,8] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

# Before tvm is imported: its thread pool otherwise uses half of the cores on x86.
os.environ.setdefault("TVM_NUM_THREADS", str(os.cpu_count()))

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
import tvm  # noqa: E402

from benchmarks.bench_kernels import matmul_model  # noqa: E402
from targets.cpu.host import host_cpu_name, host_target  # noqa: E402
from targets.cpu.kernels import dense_matmul_func, pack_dense_weight  # noqa: E402

SHAPES = ((576, 1536), (1536, 576), (2048, 5632))
ROWS = (1, 8)
ORT_THREADS = 2
MAX_REL_ERROR = 1e-4
# Pause before each implementation's turn: long enough for the others' threads to sleep.
IDLE_SECONDS = 0.25


def ort_session(model: bytes) -> ort.InferenceSession:
    """A session on the process-wide thread pool (see ``use_global_ort_threads``)."""
    options = ort.SessionOptions()
    options.use_per_session_threads = False
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def use_global_ort_threads() -> None:
    """Gives every onnxruntime session one shared pool of ``ORT_THREADS`` threads.

    The benchmark holds hundreds of sessions, one per weight copy. With a pool per session,
    the pools of the sessions that ran last keep spinning while the next one runs and starve
    it of cores; a model with many MatMuls in one session shares one pool, and so do these.
    Must run before the first session is created.
    """
    ort.capi._pybind_state.set_global_thread_pool_sizes(ORT_THREADS, 1)


def busy_cpu_seconds() -> tuple[float, float]:
    """CPU seconds spent so far by the whole machine and by this process (Linux)."""
    with open("/proc/stat") as stat:
        user, nice, system, _idle, _iowait, irq, softirq, steal = map(
            int, stat.readline().split()[1:9]
        )
    machine = (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")
    own = os.times()
    return machine, own.user + own.system


def compile_kernel(m: int, k: int, n: int):
    """The host-compiled ``dense_matmul_func(m, k, n)``, as a callable."""
    func = dense_matmul_func(m, k, n)
    symbol = str(func.attrs["global_symbol"])
    return tvm.compile(tvm.IRModule({symbol: func}), target=host_target()).mod[symbol]


def time_calls(calls) -> list[float]:
    """Times each call in ``calls`` on its own, in milliseconds."""
    times = []
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
    model = matmul_model(weight)
    ours_weights, numpy_weights, sessions = [], [], []
    # Allocated in turn: on the development VM, weights allocated first streamed 10-15%
    # slower than those allocated later, so no implementation may get all of one kind.
    for _ in range(copies):
        ours_weights.append(tvm.runtime.tensor(packed, device))
        numpy_weights.append(weight.copy())
        sessions.append(ort_session(model))

    results = []
    for m in rows:
        x = rng.standard_normal((m, k), dtype=np.float32)
        expected = x.astype(np.float64) @ weight.astype(np.float64)

        kernel = compile_kernel(m, k, n)
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
        start_wall, (start_machine, start_own) = time.perf_counter(), busy_cpu_seconds()
        for _ in range(repeats):  # interleaved so that drift in the host hits all alike
            for name, calls in impls.items():
                # Every library's idle threads spin for a while after a call (OpenBLAS's
                # for up to about 0.1 s); on two cores they slow whichever runs next.
                time.sleep(IDLE_SECONDS)
                calls[-1]()  # wakes this library's threads
                times[name] += time_calls(calls)
        end_machine, end_own = busy_cpu_seconds()
        other_cores = max(
            0.0,
            ((end_machine - start_machine) - (end_own - start_own))
            / (time.perf_counter() - start_wall),
        )
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
                "ours_weight_gb_per_s": weight.nbytes / medians["ours"] / 1e6,
                "other_processes_cores": other_cores,
            }
        )
        r = results[-1]
        print(
            f"{m:>4} {k:>6} {n:>6} {r['ours_ms']:>9.4f} {r['ort_ms']:>9.4f} "
            f"{r['numpy_ms']:>9.4f} {r['ours_over_ort']:>8.3f} {r['ours_weight_gb_per_s']:>9.1f} "
            f"{other_cores:>6.2f}",
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
        "--rows",
        default=",".join(map(str, ROWS)),
        help="comma-separated values of M to run (default %(default)s)",
    )
    parser.add_argument(
        "--cold-bytes",
        type=float,
        default=1.25e9,
        help="bytes of weight copies each implementation rotates over (default 1.25e9)",
    )
    args = parser.parse_args(argv)
    rows = tuple(int(m) for m in args.rows.split(","))
    repeats = 2 if args.quick else args.repeats
    cold_bytes = int(0.6e9 if args.quick else args.cold_bytes)

    target = host_target()
    print(
        f"target {target}, TVM_NUM_THREADS={os.environ['TVM_NUM_THREADS']}, "
        f"ORT {ort.__version__} ({ORT_THREADS} threads), cold rotation {cold_bytes / 1e9:.2f} GB"
    )
    print(
        f"{'M':>4} {'K':>6} {'N':>6} {'ours ms':>9} {'ort ms':>9} {'numpy ms':>9} "
        f"{'ours/ort':>8} {'ours GB/s':>9} {'others':>6}"
    )
    use_global_ort_threads()
    rng = np.random.default_rng(0)
    results = []
    for k, n in SHAPES:
        results += bench_shape(k, n, rows, repeats, cold_bytes, rng)
    worst = max(results, key=lambda r: r["ours_over_ort"])
    print(
        f"worst ours/ort: {worst['ours_over_ort']:.3f} "
        f"(M={worst['m']} K={worst['k']} N={worst['n']})"
    )

    if args.json:
        report = {
            "target": str(target),
            "cpu": host_cpu_name(),
            "cpu_count": os.cpu_count(),
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
