"""Benchmarks the activation-sparse quantized kernels against the dense quantized ones.

For each weight shape ``(K, N)`` at ``M = 1`` the script builds, for the host:
``targets.cpu.quant_gated_kernels``' gated int8, int4 and symmetric int4 kernels, the dense
kernels of the same dtypes (``targets.cpu.quant_kernels``, each on its default path), the
fp32 gated kernel (``targets.cpu.sparse_kernels.gated_matmul_func``) and the fp32 dense
kernel. Each gated kernel runs at every inactive fraction of ``--inactive`` (the threshold
is that quantile of ``|x|``, ``x`` standard normal: a random pattern of inactive inputs, as
an activation gate gives) and is checked first against numpy on the weight its codes
represent.

The weights are cold as in ``benchmarks/quant_gemv.py``: each kernel rotates over copies of
its arrays that together exceed ``--cold-bytes``, so every call reads its weights from
DRAM; the kernels (and fractions) take turns, one pass over their copies each,
``--repeats`` times, and the table gives each one's median call.

Columns: ``MB`` the bytes a call must read (codes of active inputs, every scale and
minimum; all of them for a dense kernel), ``x dense`` the speedup over the dense kernel
of the same dtype, ``ideal`` that kernel's bytes over these (the speedup if both streamed
at the same rate), ``x fp32g`` the speedup over the fp32 gated kernel at the same fraction,
``GB/s`` the needed bytes over the median time. ``others`` is the cores other processes
used meanwhile (``/proc/stat``).

Usage::

    python benchmarks/quant_gated_gemv.py [--repeats N] [--shapes 2048x5632] [--inactive 0,0.5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
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
from benchmarks.quant_gemv import IDLE_SECONDS, KINDS, _build, _check, cpu_model, load_average  # noqa: E402
from targets.cpu import quant_gated_kernels as qg  # noqa: E402
from targets.cpu import quant_kernels as qk  # noqa: E402
from targets.cpu.host import host_cpu_name, host_target  # noqa: E402
from targets.cpu.kernels import pack_dense_weight  # noqa: E402
from targets.cpu.sparse_kernels import gated_matmul_func  # noqa: E402

SHAPES = ((2048, 5632), (576, 1536), (1536, 576))
INACTIVE = (0.0, 0.25, 0.4, 0.5, 0.7)


def _entry(label, kernel, arrays, gated, expected):
    return {"label": label, "kernel": kernel, "arrays": arrays, "gated": gated, "expected": expected}


def kernels_for_shape(k: int, n: int, inactive, cold_bytes: float, rng) -> tuple[list[dict], dict]:
    """Every kernel of one shape, built and given its cold copies, and the inputs per fraction:
    ``{fraction: (x, threshold, active inputs)}``."""
    weight = rng.standard_normal((k, n), dtype=np.float32) / np.float32(np.sqrt(k))
    x = rng.standard_normal((1, k), dtype=np.float32)
    inputs = {}
    for fraction in inactive:
        level = -1.0 if fraction == 0 else float(np.quantile(np.abs(x), fraction))
        threshold = np.full(k, level, np.float32)
        inputs[fraction] = (threshold, np.where(np.abs(x) > threshold, x, 0).astype(np.float64),
                            int((np.abs(x) > threshold).sum()))
    entries = [
        _entry("fp32", compile_kernel(1, k, n), [pack_dense_weight(weight)], False, x.astype(np.float64) @ weight),
        _entry("fp32 gated", _build(gated_matmul_func(1, k, n, True)), [weight], True, weight.astype(np.float64)),
    ]
    for label, bits, symmetric in KINDS:
        quantized = qk.quantize_int8(weight) if bits == 8 else qk.quantize_int4(weight, symmetric=symmetric)
        dense = (qk.dequantize_int8(quantized) if bits == 8 else qk.dequantize_int4(quantized)).astype(np.float64)
        path = qk.default_path(bits, 1)
        func = qk.int8_matmul_func(1, k, n) if bits == 8 else qk.int4_matmul_func(1, k, n, symmetric=symmetric)
        seen = qk.quantize_activations(x) if path == "vnni" else x
        entries.append(_entry(label, _build(func), quantized.arrays(), False, seen.astype(np.float64) @ dense))
        packed = qg.pack_gated(quantized)
        gated_func = (qg.gated_int8_matmul_func(1, k, n) if bits == 8
                      else qg.gated_int4_matmul_func(1, k, n, symmetric=symmetric))
        entries.append(_entry(f"{label} gated", _build(gated_func), packed.arrays(), True, dense))
    for entry in entries:
        entry["bytes"] = sum(a.nbytes for a in entry["arrays"])
        entry["copies"] = [[tvm.runtime.tensor(a) for a in entry["arrays"]]
                           for _ in range(max(2, int(-(-cold_bytes // entry["bytes"]))))]
    x_tvm = tvm.runtime.tensor(x)
    y_tvm = tvm.runtime.tensor(np.zeros((1, n), np.float32))
    for entry in entries:
        fractions = inactive if entry["gated"] else (None,)
        entry["calls"] = {}
        for fraction in fractions:
            lead = [x_tvm] if fraction is None else [x_tvm, tvm.runtime.tensor(inputs[fraction][0])]
            entry["kernel"](*lead, *entry["copies"][0], y_tvm)
            expected = entry["expected"] if fraction is None else inputs[fraction][1] @ entry["expected"]
            _check(f"{entry['label']} {k}x{n} {fraction}", y_tvm.numpy(), expected)
            entry["calls"][fraction] = [lambda e=entry, c=c, lead=lead: e["kernel"](*lead, *c, y_tvm)
                                        for c in entry["copies"]]
    return entries, inputs


def _needed_bytes(entry: dict, k: int, active: int) -> float:
    """The bytes a gated call must read with ``active`` of ``k`` inputs active: the codes of
    those inputs and every scale and minimum (for fp32, the active rows)."""
    codes = entry["arrays"][0].nbytes
    return codes * active / k + (entry["bytes"] - codes)


def bench(k: int, n: int, inactive, repeats: int, cold_bytes: float, rng) -> list[dict]:
    entries, inputs = kernels_for_shape(k, n, inactive, cold_bytes, rng)
    turns = [(entry, fraction) for entry in entries for fraction in entry["calls"]]
    times = {(entry["label"], fraction): [] for entry, fraction in turns}
    start_wall, (start_machine, start_own) = time.perf_counter(), busy_cpu_seconds()
    for _ in range(repeats):
        for entry, fraction in turns:
            time.sleep(IDLE_SECONDS)
            entry["calls"][fraction][-1]()  # wakes the thread pool
            times[entry["label"], fraction] += time_calls(entry["calls"][fraction])
    end_machine, end_own = busy_cpu_seconds()
    others = max(0.0, ((end_machine - start_machine) - (end_own - start_own)) / (time.perf_counter() - start_wall))
    median = {key: statistics.median(spent) for key, spent in times.items()}
    by_label = {entry["label"]: entry for entry in entries}
    rows = []
    for entry, fraction in turns:
        if not entry["gated"]:
            rows.append({"k": k, "n": n, "kernel": entry["label"], "inactive": None, "ms": median[entry["label"], None],
                         "mb": entry["bytes"] / 1e6, "other_cores": others})
            continue
        dense_label = entry["label"].removesuffix(" gated")
        dense = by_label[dense_label]
        needed = _needed_bytes(entry, k, inputs[fraction][2])
        ms = median[entry["label"], fraction]
        rows.append({
            "k": k, "n": n, "kernel": entry["label"], "inactive": fraction, "ms": ms, "mb": needed / 1e6,
            "gb_per_s": needed / ms / 1e6, "speedup_vs_dense": median[dense_label, None] / ms,
            "ideal_vs_dense": dense["bytes"] / needed,
            "speedup_vs_fp32_gated": median["fp32 gated", fraction] / ms, "other_cores": others,
        })
    return rows


def lscpu() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return cpu_model()
    keep = ("Model name", "CPU(s):", "L2 cache", "L3 cache")
    return "; ".join(" ".join(line.split()) for line in out.splitlines() if line.startswith(keep))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7, help="passes over every kernel's copies (default 7)")
    parser.add_argument("--shapes", default=",".join(f"{k}x{n}" for k, n in SHAPES),
                        help="comma-separated KxN weight shapes (default %(default)s)")
    parser.add_argument("--inactive", default=",".join(map(str, INACTIVE)),
                        help="comma-separated fractions of inactive inputs (default %(default)s)")
    parser.add_argument("--cold-bytes", type=float, default=0.15e9,
                        help="bytes of weight copies each kernel rotates over (default 0.15e9)")
    parser.add_argument("--json", metavar="PATH", help="also write the results here as JSON")
    args = parser.parse_args(argv)
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    inactive = [float(v) for v in args.inactive.split(",")]

    print(f"CPU {lscpu()} (LLVM {host_cpu_name()}), TVM_NUM_THREADS={os.environ['TVM_NUM_THREADS']}, "
          f"cold rotation {args.cold_bytes / 1e9:.2f} GB, M = 1")
    print(f"load average at start {load_average()}")
    print(f"{'K x N':>11} {'kernel':>14} {'inactive':>8} {'ms':>8} {'MB':>6} {'GB/s':>5} {'x dense':>7} "
          f"{'ideal':>5} {'x fp32g':>7} {'others':>6}")
    rng = np.random.default_rng(0)
    results = []
    for k, n in shapes:
        for r in bench(k, n, inactive, args.repeats, args.cold_bytes, rng):
            results.append(r)
            if r["inactive"] is None:
                print(f"{f'{k}x{n}':>11} {r['kernel']:>14} {'dense':>8} {r['ms']:>8.4f} {r['mb']:>6.2f}", flush=True)
            else:
                print(f"{f'{k}x{n}':>11} {r['kernel']:>14} {r['inactive']:>8.0%} {r['ms']:>8.4f} {r['mb']:>6.2f} "
                      f"{r['gb_per_s']:>5.1f} {r['speedup_vs_dense']:>7.2f} {r['ideal_vs_dense']:>5.2f} "
                      f"{r['speedup_vs_fp32_gated']:>7.2f} {r['other_cores']:>6.2f}", flush=True)
    print(f"load average at end {load_average()}")
    if args.json:
        report = {"cpu": lscpu(), "llvm_cpu": host_cpu_name(), "target": str(host_target()),
                  "tvm_num_threads": int(os.environ["TVM_NUM_THREADS"]), "cold_bytes": args.cold_bytes,
                  "repeats": args.repeats, "results": results}
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
