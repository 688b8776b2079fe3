"""``sparsecc profile`` for CPU artifacts: host time per operator, gate sparsity, memory,
and roofline estimates on hardware models of edge CPUs.

Host time: TVM 0.27's virtual machine has no profiler reachable from Python, so every
compiled function is timed through the VM's instrument hook (``set_instrument``), which
is called before and after each call. The hook itself costs a few microseconds a call;
the report gives the uninstrumented run time beside the instrumented sum so the reader
sees that overhead. The model runs ``REPEATS`` times and each operator's median is kept.
The first parallel kernel of a run also absorbs the wake-up of TVM's thread pool, which
sleeps between runs here but not between the back-to-back steps of a generation.

Gate sparsity: the gated and dual-sparse kernels take the gate's input and threshold, so
the fraction of inputs at or below the threshold is the activation sparsity the gate
really produced on the profiling input; it is reported beside the calibrated target.

Estimates: each call's bytes (its tensor arguments; for gated kernels the weight bytes
times the fraction of active inputs) and FLOPs (for our kernels 2 per stored weight per
row of ``x``, from the facts their symbols spell out, ``formats.parse_symbol``; one per
output element for elementwise and reduction code, and for gathers) give
``max(bytes / (bandwidth x efficiency), flops / (peak x efficiency)) + call overhead``
on each hardware model (``targets/hardware/*.toml``, kind ``cpu``).
"""

from __future__ import annotations

import base64
import io
import math
import resource
import time
from pathlib import Path

import numpy as np

import formats
from runtime.errors import SparseccError

REPEATS = 5
DEFAULT_HARDWARE = ("raspberry-pi-5", "jetson-orin-nano-cpu", "laptop-x86")
HARDWARE_KEYS = {"memory_bandwidth_gbs": (int, float), "bandwidth_efficiency": (int, float), "peak_gflops_fp32": (int, float),
                 "compute_efficiency": (int, float), "call_overhead_us": (int, float), "memory_gb": (int, float)}


def _nbytes(value) -> int:
    if not hasattr(value, "shape") or not hasattr(value, "dtype"):
        return 0
    return int(np.prod([int(d) for d in value.shape])) * np.dtype(str(value.dtype)).itemsize


def _elements(value) -> int:
    return int(np.prod([int(d) for d in value.shape])) if hasattr(value, "shape") else 0


def _kernel_cost(name: str, args: list, active: float | None) -> tuple[float, float]:
    """(bytes, FLOPs) of one call of the compiled function ``name`` on ``args``."""
    tensors = [a for a in args if hasattr(a, "shape")]
    total = sum(_nbytes(a) for a in tensors)
    facts = formats.parse_symbol(name)
    flops = formats.get(facts.format).flops(facts) if facts is not None else None
    if flops is None:
        return float(total), float(_elements(tensors[-1]) if tensors else 0)
    if active is not None:
        # Gated kernels read the weight rows of active inputs only.
        weights = sum(_nbytes(a) for a in tensors[2:-1])
        total = total - weights + weights * active
        flops *= active
    return float(total), flops


def default_inputs(model) -> dict[str, np.ndarray]:
    """Inputs for profiling: random token ids from the valid range; for a decoder, the
    decode step after a real prompt (the start of Python's pydoc text, prefilled by the
    decoder itself), with the cache it filled."""
    rng = np.random.default_rng(0)
    if model.manifest.decoding:
        from runtime.corpus import pydoc_text

        prompt = model.tokenizer.encode(pydoc_text()[:2000])[: model.max_context // 2]
        token = next(iter(model.generate_ids(prompt, max_new_tokens=1)))
        feeds = {spec.name: array.copy() for spec, array in zip(model.inputs[2:], model._cache)}
        return {"input_ids": np.array([[token]], np.int64), "position": np.array([len(prompt)], np.int64), **feeds}
    ranges = model.manifest.input_ranges
    feeds = {}
    for spec in model.inputs:
        if spec.dtype.startswith("int"):
            low, high = ranges.get(spec.name, (0, 100))
            feeds[spec.name] = rng.integers(low, high, size=spec.shape).astype(spec.dtype)
        else:
            feeds[spec.name] = rng.standard_normal(spec.shape).astype(spec.dtype)
    return feeds


def _measure(model, inputs: dict[str, np.ndarray]) -> dict:
    """Runs the model instrumented; returns per-call records and gate sparsities."""
    tvm_vm = model._vm
    calls: list[dict] = []
    starts: list[float] = []
    record = {"on": False, "gates": True}

    def instrument(func, name, before, ret, *args):
        if name.startswith("vm.builtin") or not record["on"]:
            return 0
        if before:
            active = None
            facts = formats.parse_symbol(name) if record["gates"] else None
            if facts is not None and facts.role == "gated":
                x, threshold = args[0].numpy(), args[1].numpy()
                active = float((np.abs(x) > threshold.reshape(-1)[None, :] if threshold.size > 1 else np.abs(x) > threshold[0]).mean())
            calls.append({"name": name, "active": active, "args": list(args)})
            starts.append(time.perf_counter())
        else:
            calls[len(starts) - 1]["seconds"] = time.perf_counter() - starts[-1]
        return 0

    runs = []
    tvm_vm.set_instrument(instrument)
    try:
        for repeat in range(REPEATS + 1):
            calls.clear()
            starts.clear()
            record.update(on=True, gates=repeat == 0)
            model.run(inputs)
            record["on"] = False
            runs.append([dict(c) for c in calls])
    finally:
        tvm_vm.set_instrument(lambda *args: 0)
    first = runs[0]
    timed = runs[1:]
    for index, call in enumerate(first):
        call["seconds"] = float(np.median([run[index]["seconds"] for run in timed]))
        call["bytes"], call["flops"] = _kernel_cost(call["name"], call.pop("args"), call["active"])
    return {"calls": first}


def _estimate(calls: list[dict], hardware: dict, weight_bytes: int) -> dict:
    from targets.hardware import value

    bandwidth = value(hardware, "memory_bandwidth_gbs") * 1e9 * value(hardware, "bandwidth_efficiency")
    peak = value(hardware, "peak_gflops_fp32") * 1e9 * value(hardware, "compute_efficiency")
    overhead = value(hardware, "call_overhead_us") * 1e-6
    memory_bound = compute_bound = 0.0
    total = 0.0
    for call in calls:
        memory_time, compute_time = call["bytes"] / bandwidth, call["flops"] / peak
        total += max(memory_time, compute_time) + overhead
        memory_bound += memory_time >= compute_time
        compute_bound += memory_time < compute_time
    return {
        "hardware": hardware["name"],
        "description": hardware.get("description", ""),
        "seconds": total,
        "overhead_seconds": overhead * len(calls),
        "memory_bound_calls": int(memory_bound),
        "compute_bound_calls": int(compute_bound),
        "fits_in_memory": weight_bytes < value(hardware, "memory_gb") * 1e9,
        "path": hardware["path"],
    }


def profile(manifest, options, progress) -> dict:
    """The CPU profile of ``options.artifact`` (see the module docstring)."""
    import tvm  # noqa: F401  (the full TVM, so the runtime does not load it runtime-only)

    import runtime
    from targets.hardware import load, require

    hardware = []
    for name in options.hardware or DEFAULT_HARDWARE:
        spec = load(name, "cpu")
        require(spec, HARDWARE_KEYS)
        hardware.append(spec)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    model = runtime.load(options.artifact)
    inputs = options.inputs if options.inputs is not None else default_inputs(model)
    model._check_inputs(inputs)
    with progress.step(f"profiling {options.artifact} ({REPEATS} instrumented runs)"):
        measured = _measure(model, inputs)
        plain = model.time(inputs, REPEATS)
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    calls = measured["calls"]
    operators: dict[str, dict] = {}
    for call in calls:
        entry = operators.setdefault(call["name"], {"operator": call["name"], "calls": 0, "seconds": 0.0, "bytes": 0.0, "flops": 0.0})
        entry["calls"] += 1
        entry["seconds"] += call["seconds"]
        entry["bytes"] += call["bytes"]
        entry["flops"] += call["flops"]
    ranked = sorted(operators.values(), key=lambda e: -e["seconds"])
    instrumented = sum(call["seconds"] for call in calls)
    for entry in ranked:
        entry["share"] = entry["seconds"] / instrumented if instrumented else 0.0
    target = manifest.summary.get("activation_sparsity_target")
    gates = [{"gate": index, "kernel": call["name"], "sparsity": 1.0 - call["active"], "target": target}
             for index, call in enumerate(c for c in calls if c["active"] is not None)]
    unique = {(w.offset, w.nbytes) for w in manifest.weights}
    for graph in manifest.graphs.values():
        unique |= {(int(w["offset"]), int(w["nbytes"])) for w in graph["weights"]}
    weight_bytes = sum(n for _, n in unique)
    report = {
        "artifact": str(options.artifact),
        "target": manifest.target,
        "inputs": {name: list(array.shape) for name, array in inputs.items()},
        "run_seconds": plain,
        "instrumented_seconds": instrumented,
        "calls": len(calls),
        "operators": ranked,
        "gates": gates,
        "activation_sparsity_target": target,
        "weight_bytes": weight_bytes,
        "peak_rss_bytes": peak_rss,
        "rss_growth_bytes": max(peak_rss - before, 0),
        "estimates": [_estimate(calls, spec, weight_bytes) for spec in hardware],
        "host_bytes_per_run": sum(call["bytes"] for call in calls),
    }
    if options.report_dir or options.plot_dir:
        plots = _plots(report)
        if options.plot_dir:
            folder = Path(options.plot_dir)
            folder.mkdir(parents=True, exist_ok=True)
            for name, png in plots.items():
                _write_atomic(folder / f"{name}.png", png)
        if options.report_dir:
            folder = Path(options.report_dir)
            folder.mkdir(parents=True, exist_ok=True)
            _write_atomic(folder / "index.html", _html(report, plots).encode())
            report["report"] = str(folder / "index.html")
    return report


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_bytes(data)
    tmp.replace(path)


def _plots(report: dict) -> dict[str, bytes]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def png(figure) -> bytes:
        buffer = io.BytesIO()
        figure.tight_layout()
        figure.savefig(buffer, format="png", dpi=110)
        plt.close(figure)
        return buffer.getvalue()

    plots = {}
    top = report["operators"][:20][::-1]
    figure, axis = plt.subplots(figsize=(9, 0.3 * len(top) + 1.2))
    axis.barh([e["operator"][:60] for e in top], [e["seconds"] * 1e3 for e in top], color="#4878a8")
    axis.set_xlabel("host time per run, ms (all calls of the operator)")
    axis.set_title("Time per operator (top 20)")
    axis.tick_params(axis="y", labelsize=7)
    plots["operators"] = png(figure)
    if report["gates"]:
        figure, axis = plt.subplots(figsize=(9, 3.2))
        indices = [g["gate"] for g in report["gates"]]
        axis.bar(indices, [g["sparsity"] * 100 for g in report["gates"]], color="#58a868", label="produced on this input")
        if report["activation_sparsity_target"] is not None:
            axis.axhline(report["activation_sparsity_target"] * 100, color="#c44", linestyle="--", label="calibrated target")
        axis.set_xlabel("gated kernel, in execution order (4 per layer in Llama: q/k/v, o, gate/up, down)")
        axis.set_ylabel("activation sparsity, %")
        axis.set_ylim(0, 100)
        axis.legend(loc="lower right")
        axis.set_title("Activation sparsity per gate")
        plots["sparsity"] = png(figure)
    figure, axis = plt.subplots(figsize=(7, 3))
    names = ["this host (measured)"] + [e["hardware"] for e in report["estimates"]]
    values = [report["run_seconds"] * 1e3] + [e["seconds"] * 1e3 for e in report["estimates"]]
    axis.bar(names, values, color=["#888"] + ["#4878a8"] * len(report["estimates"]))
    axis.set_ylabel("ms per run")
    axis.set_title("Latency: measured here and estimated per device")
    plots["estimates"] = png(figure)
    return plots


def _html(report: dict, plots: dict[str, bytes]) -> str:
    import html

    def image(name: str) -> str:
        if name not in plots:
            return "<p>(no gated kernels in this artifact)</p>"
        return f'<img alt="{name}" src="data:image/png;base64,{base64.b64encode(plots[name]).decode()}">'

    rows = "".join(
        f"<tr><td>{html.escape(e['operator'])}</td><td>{e['calls']}</td><td>{e['seconds'] * 1e3:.3f}</td>"
        f"<td>{e['share']:.1%}</td><td>{e['bytes'] / 1e6:.2f}</td><td>{e['flops'] / 1e6:.2f}</td></tr>"
        for e in report["operators"][:40])
    estimates = "".join(
        f"<tr><td>{html.escape(e['hardware'])}</td><td>{html.escape(e['description'])}</td><td>{e['seconds'] * 1e3:.2f}</td>"
        f"<td>{e['memory_bound_calls']} / {e['compute_bound_calls']}</td><td>{'yes' if e['fits_in_memory'] else 'no'}</td></tr>"
        for e in report["estimates"])
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>sparsecc profile: {html.escape(report['artifact'])}</title>
<style>body{{font-family:sans-serif;max-width:1000px;margin:2em auto}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:2px 6px;font-size:13px}}img{{max-width:100%}}</style></head><body>
<h1>sparsecc profile</h1>
<p>{html.escape(report['artifact'])}, target {html.escape(str(report['target'].get('name')))}
({html.escape(str(report['target'].get('mcpu')))}). One run: {report['run_seconds'] * 1e3:.2f} ms uninstrumented,
{report['instrumented_seconds'] * 1e3:.2f} ms summed over {report['calls']} instrumented calls (the hook adds a few
microseconds per call). Weights {report['weight_bytes'] / 1e6:.1f} MB; peak resident memory
{report['peak_rss_bytes'] / 1e6:.0f} MB.</p>
<h2>Time per operator</h2>{image('operators')}
<table><tr><th>operator</th><th>calls</th><th>ms</th><th>share</th><th>MB moved</th><th>MFLOP</th></tr>{rows}</table>
<h2>Activation sparsity per gate</h2>{image('sparsity')}
<h2>Estimated latency on edge CPUs</h2>{image('estimates')}
<table><tr><th>model</th><th>device</th><th>ms per run</th><th>memory / compute bound calls</th><th>fits</th></tr>{estimates}</table>
<p>Estimates: per call, max(bytes / (bandwidth x efficiency), FLOPs / (peak x efficiency)) + call overhead, from each
hardware model's TOML file (every number there carries its source).</p>
</body></html>
"""


def describe(report: dict) -> list[str]:
    lines = [f"{report['artifact']}: {report['run_seconds'] * 1e3:.2f} ms per run on this host "
             f"({report['calls']} calls; instrumented sum {report['instrumented_seconds'] * 1e3:.2f} ms), "
             f"weights {report['weight_bytes'] / 1e6:.1f} MB, peak memory {report['peak_rss_bytes'] / 1e6:.0f} MB"]
    lines.append(f"{'operator':60} {'calls':>5} {'ms':>8} {'share':>6}")
    for entry in report["operators"][:15]:
        lines.append(f"{entry['operator'][:60]:60} {entry['calls']:5} {entry['seconds'] * 1e3:8.3f} {entry['share']:6.1%}")
    if report["gates"]:
        produced = [g["sparsity"] for g in report["gates"]]
        target = report["activation_sparsity_target"]
        lines.append(f"gates: {len(produced)}, activation sparsity produced {np.mean(produced):.1%} on average "
                     f"(min {min(produced):.1%}, max {max(produced):.1%})"
                     + (f", calibrated target {target:.0%}" if target is not None else ""))
    for estimate in report["estimates"]:
        fits = "" if estimate["fits_in_memory"] else " (weights do not fit in its memory)"
        lines.append(f"estimate on {estimate['hardware']}: {estimate['seconds'] * 1e3:.2f} ms per run "
                     f"({estimate['memory_bound_calls']} memory-bound, {estimate['compute_bound_calls']} compute-bound calls){fits}")
    if report.get("report"):
        lines.append(f"wrote {report['report']}")
    return lines
