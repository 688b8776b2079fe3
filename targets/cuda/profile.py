"""``sparsecc profile`` for cuda artifacts: a roofline estimate of every compiled operator
on hardware models of NVIDIA GPUs, without a GPU.

Nothing runs: the compiler recorded, for every kernel call of the model, the bytes of its
tensor operands and result and its FLOPs (``targets.cuda.target.operator_costs``: our
sparse kernels count the bytes of their stored arrays and 2 FLOPs per stored nonzero; the
rest comes from TVM's estimate). On each hardware model (``targets/hardware/*.toml``,
kind ``gpu``: memory bandwidth, FP32 peak, launch overhead, each with its source) a call
takes ``max(bytes / (bandwidth x efficiency), flops / (peak x efficiency)) + launch
overhead``. The gated and dual-sparse kernels read the weight rows of active inputs
only, so their weight bytes and FLOPs are scaled by the fraction of inputs the gates keep
(one minus the calibrated activation sparsity, or ``--activation-sparsity`` of the
profile options when given); the report says which fraction it used.

These are estimates, labelled as such everywhere they are printed: they ignore caches
(weights are assumed to come from DRAM every call, true for models much larger than L2),
occupancy, and overlap between kernels.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path

from runtime.errors import SparseccError

DEFAULT_HARDWARE = ("jetson-orin-nano-gpu", "a100", "h100")
HARDWARE_KEYS = {"memory_bandwidth_gbs": (int, float), "bandwidth_efficiency": (int, float), "peak_gflops_fp32": (int, float),
                 "compute_efficiency": (int, float), "call_overhead_us": (int, float), "memory_gb": (int, float)}


def _scaled(call: dict, active: float) -> dict:
    """``call`` with its weight bytes and FLOPs scaled to the active inputs of its gate."""
    if call["kind"] not in ("gated", "dual"):
        return call
    weight = call.get("weight_bytes", 0)
    return {**call, "bytes": call["bytes"] - weight + weight * active, "flops": call["flops"] * active}


def _per_call(call: dict, hardware: dict) -> dict:
    from targets.hardware import value

    bandwidth = value(hardware, "memory_bandwidth_gbs") * 1e9 * value(hardware, "bandwidth_efficiency")
    peak = value(hardware, "peak_gflops_fp32") * 1e9 * value(hardware, "compute_efficiency")
    memory_time, compute_time = call["bytes"] / bandwidth, call["flops"] / peak
    return {"seconds": max(memory_time, compute_time) + value(hardware, "call_overhead_us") * 1e-6,
            "memory_bound": memory_time >= compute_time}


def estimate(calls: list[dict], hardware: dict, weight_bytes: int, arch: str) -> dict:
    """The roofline estimate of one run of ``calls`` on ``hardware``."""
    from targets.hardware import value

    timed = [_per_call(call, hardware) for call in calls]
    operators: dict[str, float] = {}
    for call, cost in zip(calls, timed):
        operators[call["name"]] = operators.get(call["name"], 0.0) + cost["seconds"]
    device_arch = value(hardware, "arch") if "arch" in hardware else None
    return {
        "hardware": hardware["name"],
        "description": hardware.get("description", ""),
        "estimate": True,
        "seconds": sum(cost["seconds"] for cost in timed),
        "overhead_seconds": value(hardware, "call_overhead_us") * 1e-6 * len(calls),
        "memory_bound_calls": sum(cost["memory_bound"] for cost in timed),
        "compute_bound_calls": sum(not cost["memory_bound"] for cost in timed),
        "fits_in_memory": weight_bytes < value(hardware, "memory_gb") * 1e9,
        "device_arch": device_arch,
        "arch_matches": device_arch is None or device_arch == arch,
        "operator_seconds": operators,
        "path": hardware["path"],
    }


def profile(manifest, options, progress) -> dict:
    """The estimated profile of a cuda artifact (see the module docstring)."""
    from targets.hardware import load, require

    target = manifest.target
    calls = target.get("operators")
    if not calls:
        raise SparseccError(f"{options.artifact} records no operator costs; compile it again with this version of sparsecc.")
    hardware = []
    for name in options.hardware or DEFAULT_HARDWARE:
        spec = load(name, "gpu")
        require(spec, HARDWARE_KEYS)
        hardware.append(spec)
    sparsity = manifest.summary.get("activation_sparsity_target")
    active = 1.0 - float(sparsity) if sparsity is not None else 1.0
    scaled = [_scaled(call, active) for call in calls]
    weight_bytes = sum(w.nbytes for w in manifest.weights)
    operators: dict[str, dict] = {}
    for call in scaled:
        entry = operators.setdefault(call["name"], {"operator": call["name"], "kind": call["kind"], "calls": 0,
                                                   "bytes": 0.0, "flops": 0.0})
        entry["calls"] += 1
        entry["bytes"] += call["bytes"]
        entry["flops"] += call["flops"]
    with progress.step(f"estimating {options.artifact} on {', '.join(spec['name'] for spec in hardware)}"):
        estimates = [estimate(scaled, spec, weight_bytes, target.get("arch", "")) for spec in hardware]
    ranked = sorted(operators.values(), key=lambda e: -e["bytes"])
    report = {
        "artifact": str(options.artifact),
        "target": {key: target[key] for key in ("name", "arch", "host_machine") if key in target},
        "estimate_only": True,
        "calls": len(calls),
        "operators": ranked,
        "gated_active_fraction": active,
        "activation_sparsity_target": sparsity,
        "weight_bytes": weight_bytes,
        "bytes_per_run": sum(call["bytes"] for call in scaled),
        "flops_per_run": sum(call["flops"] for call in scaled),
        "kernels": target.get("kernels", []),
        "estimates": estimates,
    }
    if options.report_dir:
        folder = Path(options.report_dir)
        folder.mkdir(parents=True, exist_ok=True)
        page = folder / "index.html"
        partial = folder / ".index.html.partial"
        partial.write_text(_html(report))
        partial.replace(page)
        report["report"] = str(page)
    return report


def _plot(report: dict) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    top = [entry["operator"] for entry in report["operators"][:12]]
    figure, axis = plt.subplots(figsize=(9, 4.5))
    width = 0.8 / max(len(report["estimates"]), 1)
    for index, est in enumerate(report["estimates"]):
        axis.barh([i + index * width for i in range(len(top))], [est["operator_seconds"].get(name, 0.0) * 1e6 for name in top],
                  height=width, label=est["hardware"])
    axis.set_yticks([i + 0.4 - width / 2 for i in range(len(top))], [name[:48] for name in top], fontsize=7)
    axis.invert_yaxis()
    axis.set_xscale("log")
    axis.set_xlabel("estimated microseconds per run (roofline, not measured)")
    axis.legend(fontsize=8)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    plt.close(figure)
    return base64.b64encode(buffer.getvalue()).decode()


def _html(report: dict) -> str:
    rows = "".join(f"<tr><td>{e['hardware']}</td><td>{e['description']}</td><td>{e['seconds'] * 1e3:.3f}</td>"
                   f"<td>{e['memory_bound_calls']} / {e['compute_bound_calls']}</td><td>{'yes' if e['fits_in_memory'] else 'no'}</td></tr>"
                   for e in report["estimates"])
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>sparsecc profile (estimate): {report['artifact']}</title>
<style>body{{font-family:sans-serif;max-width:60em;margin:2em auto}}td,th{{padding:2px 8px;text-align:left}}</style></head><body>
<h1>{report['artifact']}: cuda {report['target'].get('arch', '')}, estimated</h1>
<p>No GPU ran this model: every figure below is a roofline estimate from the bytes and FLOPs the compiler recorded for
each of the {report['calls']} kernel calls. Gated kernels are counted at {report['gated_active_fraction']:.0%} active inputs.</p>
<img alt="estimated time per operator" src="data:image/png;base64,{_plot(report)}">
<table><tr><th>model</th><th>device</th><th>estimated ms per run</th><th>memory / compute bound calls</th><th>weights fit</th></tr>{rows}</table>
<p>Per call: max(bytes / (bandwidth x efficiency), FLOPs / (peak x efficiency)) + launch overhead, from each hardware
model's TOML file (every number there carries its source or is marked an estimate).</p>
</body></html>
"""


def describe(report: dict) -> list[str]:
    lines = [f"{report['artifact']}: cuda {report['target'].get('arch', '')}, {report['calls']} kernel calls, "
             f"{report['bytes_per_run'] / 1e6:.2f} MB and {report['flops_per_run'] / 1e6:.1f} MFLOP per run, "
             f"weights {report['weight_bytes'] / 1e6:.1f} MB (ESTIMATES: nothing ran on a GPU)"]
    if report["activation_sparsity_target"] is not None:
        lines.append(f"gated kernels counted at {report['gated_active_fraction']:.0%} active inputs "
                     f"(calibrated activation sparsity {report['activation_sparsity_target']:.0%})")
    lines.append(f"{'operator':60} {'calls':>5} {'MB':>8} {'MFLOP':>8}")
    for entry in report["operators"][:15]:
        lines.append(f"{entry['operator'][:60]:60} {entry['calls']:5} {entry['bytes'] / 1e6:8.3f} {entry['flops'] / 1e6:8.2f}")
    for est in report["estimates"]:
        notes = [] if est["fits_in_memory"] else ["weights do not fit in its memory"]
        if not est["arch_matches"]:
            notes.append(f"the device is {est['device_arch']}; the kernels were generated for {report['target'].get('arch')}")
        lines.append(f"estimate on {est['hardware']}: {est['seconds'] * 1e3:.3f} ms per run "
                     f"({est['memory_bound_calls']} memory-bound, {est['compute_bound_calls']} compute-bound calls)"
                     + (f" ({'; '.join(notes)})" if notes else ""))
    if report.get("report"):
        lines.append(f"wrote {report['report']}")
    return lines
