"""Benchmarks the quantized matmul kernels against the fp32 dense kernel, weights from DRAM.

For each weight shape ``(K, N)`` at ``M = 1`` (``--rows`` for more), the script builds, for
the host, ``targets.cpu.kernels.dense_matmul_func`` (fp32, the baseline) and the kernels of
``targets.cpu.quant_kernels`` for int8 (Q8_0-like), int4 (Q4_1-like, scale and minimum)
and symmetric int4 (Q4_0-like), each on every path the host can run (``vnni`` where the
CPU has AVX-512 VNNI, and the portable ``fma``). Each kernel is checked first against
numpy on the weight its codes represent (and, on the ``vnni`` path, on ``x`` rounded as
the kernel rounds it).

The weights are cold: each kernel rotates over enough copies of its weight arrays that
the copies together exceed ``--cold-bytes`` (0.3 GB by default, about ten times the 32 MB
L3 of the machine this was written on), so every call reads its weights from DRAM, as one
decode step does. The kernels take turns, one pass over their copies each, ``--repeats``
times (so drift in the host hits all alike); every call is timed on its own and the table
gives the median.

Columns: ``MB`` the bytes one call reads (codes, scales and minimums; ``x`` and ``y``
are counted too but are tiny), ``GB/s`` those bytes over the median time, ``x fp32`` the
speedup over the fp32 kernel, ``ideal`` the fp32 kernel's bytes over the kernel's bytes
(its speedup if both streamed at the same rate), and ``of ideal`` = ``x fp32 / ideal``,
the kernel's bandwidth as a share of the fp32 kernel's in the same rounds; ``p10 ms``
and its ``of ideal`` are the same from each kernel's 10th-percentile call (see ``_fast``).
``hot GB/s`` is the rate of the fastest of ``HOT_CALLS`` calls on one copy, from L2 or L3
where it fits: the kernel's compute ceiling, so a kernel whose hot rate is well above its
cold one is bound by DRAM, and one whose hot rate is near its cold one by its own work.
``others``
is the cores other processes used meanwhile (``/proc/stat``); on a shared machine read
the ratios, not the times.

Usage::

    python benchmarks/quant_gemv.py [--repeats N] [--rows 1,8] [--shapes 2048x5632] [--json PATH]
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

# Before tvm is imported; two threads for the two cores of the machine this was written on.
os.environ.setdefault("TVM_NUM_THREADS", "2")

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402
import tvm  # noqa: E402

from benchmarks.dense_matmul import busy_cpu_seconds, compile_kernel, time_calls  # noqa: E402
from targets.cpu import quant_kernels as qk  # noqa: E402
from targets.cpu.host import host_cpu_name, host_target  # noqa: E402
from targets.cpu.kernels import pack_dense_weight  # noqa: E402

#: SmolLM2-135M's attention / MLP shapes, its tied output projection (the [576, 49152]
#: ``E^T``) and a larger MLP.
SHAPES = ((576, 1536), (1536, 576), (576, 49152), (2048, 5632))
ROWS = (1,)
# Against numpy on the represented weight: fp32 accumulation in another order.
MAX_REL_ERROR = 1e-4
# Pause before each kernel's turn, so the thread pool of the one before has gone idle.
IDLE_SECONDS = 0.1

#: Calls on one copy for the in-cache figure, at most, and the time they may take (see
#: ``_hot_ms``); the fastest is kept, so on a loaded machine more is better.
HOT_CALLS = 2000
HOT_SECONDS = 0.5
#: (label, bits, symmetric) of each quantized kind.
KINDS = (("int8", 8, True), ("int4", 4, False), ("int4 sym", 4, True))


def load_average() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            return next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def _build(func):
    symbol = str(func.attrs["global_symbol"])
    return tvm.compile(tvm.IRModule({symbol: func}), target=host_target()).mod[symbol]


def _check(label: str, got: np.ndarray, expected: np.ndarray) -> None:
    error = float(np.abs(got - expected).max() / np.abs(expected).max())
    if not error < MAX_REL_ERROR:
        raise AssertionError(f"{label}: relative error {error:.2e} against numpy")


def kernels_for_shape(k: int, n: int, m: int, paths, cold_bytes: float, rng) -> list[dict]:
    """Every kernel of one shape, built, checked and given its cold weight copies."""
    weight = rng.standard_normal((k, n), dtype=np.float32) / np.float32(np.sqrt(k))
    x = rng.standard_normal((m, k), dtype=np.float32)
    x_tvm = tvm.runtime.tensor(x)
    y_tvm = tvm.runtime.tensor(np.zeros((m, n), np.float32))
    io_bytes = x.nbytes + m * n * 4

    entries = [{"label": "fp32", "path": "", "arrays": [pack_dense_weight(weight)], "kernel": compile_kernel(m, k, n),
                "expected": x.astype(np.float64) @ weight.astype(np.float64)}]
    for label, bits, symmetric in KINDS:
        quantized = qk.quantize_int8(weight) if bits == 8 else qk.quantize_int4(weight, symmetric=symmetric)
        dense = qk.dequantize_int8(quantized) if bits == 8 else qk.dequantize_int4(quantized)
        for path in paths:
            func = (qk.int8_matmul_func(m, k, n, path=path) if bits == 8
                    else qk.int4_matmul_func(m, k, n, symmetric=symmetric, path=path))
            seen = qk.quantize_activations(x) if path == "vnni" else x
            entries.append({"label": label, "path": path, "arrays": quantized.arrays(), "kernel": _build(func),
                            "expected": seen.astype(np.float64) @ dense.astype(np.float64)})
    for entry in entries:
        nbytes = sum(a.nbytes for a in entry["arrays"])
        entry["bytes"] = nbytes + io_bytes
        entry["wanted"] = max(2, int(-(-cold_bytes // nbytes)))
        entry["copies"] = []
    # Allocated in turn, so that no kernel gets all of one kind of memory (on a VM, memory
    # allocated first may stream at another speed than memory allocated later).
    for i in range(max(entry["wanted"] for entry in entries)):
        for entry in entries:
            if i < entry["wanted"]:
                entry["copies"].append([tvm.runtime.tensor(a) for a in entry["arrays"]])
    for entry in entries:
        entry["kernel"](x_tvm, *entry["copies"][0], y_tvm)
        _check(f"{entry['label']} {entry['path']} {k}x{n}", y_tvm.numpy(), entry["expected"])
        entry["calls"] = [lambda e=entry, c=c: e["kernel"](x_tvm, *c, y_tvm) for c in entry["copies"]]
    return entries


def _fast(times: list[float]) -> float:
    """The 10th percentile: on a loaded machine, a call as long as the fp32 kernel's spans
    scheduler time slices and is more often interrupted than a short one, which biases the
    medians' ratios towards the short kernels; the fastest calls are the least disturbed."""
    return float(np.percentile(times, 10))


def _hot_ms(entry: dict) -> float:
    """The fastest of ``HOT_CALLS`` calls (or of those in ``HOT_SECONDS``) on one copy,
    from the caches where it fits."""
    call = entry["calls"][0]
    call()
    times, end = [], time.perf_counter() + HOT_SECONDS
    while len(times) < HOT_CALLS and (time.perf_counter() < end or len(times) < 3):
        times += time_calls([call])
    return min(times)


def bench(k: int, n: int, m: int, paths, repeats: int, cold_bytes: float, rng) -> list[dict]:
    entries = kernels_for_shape(k, n, m, paths, cold_bytes, rng)
    times = [[] for _ in entries]
    start_wall, (start_machine, start_own) = time.perf_counter(), busy_cpu_seconds()
    for _ in range(repeats):
        for entry, spent in zip(entries, times):
            time.sleep(IDLE_SECONDS)
            entry["calls"][-1]()  # wakes the thread pool
            spent += time_calls(entry["calls"])
    end_machine, end_own = busy_cpu_seconds()
    hot = [_hot_ms(entry) for entry in entries]
    others = max(0.0, ((end_machine - start_machine) - (end_own - start_own)) / (time.perf_counter() - start_wall))
    fp32_ms, fp32_fast, fp32_bytes = statistics.median(times[0]), _fast(times[0]), entries[0]["bytes"]
    rows = []
    for entry, spent, hot_ms in zip(entries, times, hot):
        ms = statistics.median(spent)
        speedup, ideal = fp32_ms / ms, fp32_bytes / entry["bytes"]
        rows.append({
            "k": k, "n": n, "m": m, "kernel": entry["label"], "path": entry["path"], "ms": ms,
            "mb": entry["bytes"] / 1e6, "gb_per_s": entry["bytes"] / ms / 1e6, "speedup_vs_fp32": speedup,
            "ideal_speedup": ideal, "share_of_ideal": speedup / ideal,
            "fast_ms": _fast(spent), "fast_share_of_ideal": fp32_fast / _fast(spent) / ideal, "calls": len(spent),
            "copies": len(entry["copies"]), "other_cores": others,
            "hot_ms": hot_ms, "hot_gb_per_s": entry["bytes"] / hot_ms / 1e6,
        })
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="passes over every kernel's copies (default 5)")
    parser.add_argument("--rows", default=",".join(map(str, ROWS)), help="comma-separated M values (default %(default)s)")
    parser.add_argument("--shapes", default=",".join(f"{k}x{n}" for k, n in SHAPES),
                        help="comma-separated KxN weight shapes (default %(default)s)")
    parser.add_argument("--cold-bytes", type=float, default=0.3e9,
                        help="bytes of weight copies each kernel rotates over (default 0.3e9)")
    parser.add_argument("--json", metavar="PATH", help="also write the results here as JSON")
    args = parser.parse_args(argv)
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    rows = [int(v) for v in args.rows.split(",")]
    paths = [p for p in qk.PATHS if p != "vnni" or qk.vnni_available()]

    print(f"CPU {cpu_model()} ({host_cpu_name()}, {os.cpu_count()} cores), TVM_NUM_THREADS="
          f"{os.environ['TVM_NUM_THREADS']}, paths {', '.join(paths)}, cold rotation {args.cold_bytes / 1e9:.2f} GB")
    print(f"load average at start {load_average()}: other processes share this machine, so compare the "
          "ratios of one shape's rows (measured in the same rounds), not absolute times")
    print(f"{'K x N':>11} {'M':>2} {'kernel':>8} {'path':>4} {'ms':>8} {'MB':>7} {'GB/s':>6} "
          f"{'x fp32':>6} {'ideal':>5} {'of ideal':>8} {'p10 ms':>8} {'of ideal':>8} {'hot GB/s':>8} {'others':>6}")
    rng = np.random.default_rng(0)
    results = []
    for k, n in shapes:
        for m in rows:
            for r in bench(k, n, m, paths, args.repeats, args.cold_bytes, rng):
                results.append(r)
                print(f"{f'{k}x{n}':>11} {m:>2} {r['kernel']:>8} {r['path']:>4} {r['ms']:>8.4f} {r['mb']:>7.2f} "
                      f"{r['gb_per_s']:>6.1f} {r['speedup_vs_fp32']:>6.2f} {r['ideal_speedup']:>5.2f} "
                      f"{r['share_of_ideal']:>8.0%} {r['fast_ms']:>8.4f} {r['fast_share_of_ideal']:>8.0%} "
                      f"{r['hot_gb_per_s']:>8.0f} {r['other_cores']:>6.2f}", flush=True)
    print(f"load average at end {load_average()}")
    if args.json:
        report = {"cpu": cpu_model(), "llvm_cpu": host_cpu_name(), "target": str(host_target()),
                  "tvm_num_threads": int(os.environ["TVM_NUM_THREADS"]), "cold_bytes": args.cold_bytes,
                  "repeats": args.repeats, "results": results}
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
