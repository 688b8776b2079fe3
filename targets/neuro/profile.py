"""``sparsecc profile`` for neuromorphic artifacts: simulate one run, cost it on the chip.

The artifact runs event by event (``runtime.neuro``) on the given inputs or on default
token ids; ``targets.neuro.cost`` turns the counts into latency, energy by component and
the bottleneck class, per token. With ``--plot DIR`` it writes ``utilisation.png`` (a heat
map of per-core utilisation on the mesh) and ``memory.png`` (memory fill per core) and
``energy.png`` (energy by component against the dense equivalent).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from runtime.errors import SparseccError
from runtime.neuro import chip_grid, core_xy
from targets.neuro.cost import COMPONENTS, estimate


def default_inputs(manifest, seed: int = 0) -> dict[str, np.ndarray]:
    """Token ids below the model's vocabulary (or standard normal values) of the compiled shapes."""
    rng = np.random.default_rng(seed)
    vocab = manifest.target.get("vocabulary") or 100
    inputs = {}
    for spec in manifest.inputs:
        if spec.dtype.startswith("int"):
            inputs[spec.name] = rng.integers(0, vocab, size=spec.shape).astype(spec.dtype)
        else:
            inputs[spec.name] = rng.standard_normal(spec.shape).astype(spec.dtype)
    return inputs


def memory_fill(target: dict) -> list[float]:
    """Fraction of every core's memory that the placement fills (0 for unused cores)."""
    chip = target["chip"]
    fill = np.zeros(chip["cores_per_chip"] * chip["chips"])
    for layer in target["layers"]:
        placement = layer["placement"]
        fill[placement["cores"]] = np.asarray(placement["bytes"]) / chip["memory_bytes"]
    return fill.tolist()


def simulate_report(model, inputs: dict[str, np.ndarray]) -> dict:
    """Runs ``model`` (a ``runtime.neuro.NeuroModel``) on ``inputs``; the cost report."""
    _, counts = model.simulate(inputs)
    target = model.manifest.target
    report = estimate(target, [count.to_dict() for count in counts])
    chip = target["chip"]
    report.update({
        "chip": {key: chip[key] for key in ("name", "description", "chips", "columns", "rows", "cores_per_chip")},
        "tokens": counts[0].rows if counts else 0,
        "memory_fill": memory_fill(target),
        "sources": chip["sources"],
    })
    return report


def profile(manifest, options, progress) -> dict:
    """The profile contract of ``compiler.profile``: simulate, cost, optionally plot."""
    import runtime

    if options.hardware:
        raise SparseccError("a neuro artifact is profiled on the chip model it was compiled for; "
                            "recompile with -t neuro:<chip> to use another one.")
    if options.report_dir:
        raise SparseccError("--report (HTML) is not built for neuro artifacts yet; use --json and --plot.")
    with progress.step("simulating event by event"):
        model = runtime.load(options.artifact)
        report = simulate_report(model, options.inputs or default_inputs(manifest))
    report["artifact"] = str(options.artifact)
    if options.plot_dir:
        report["plots"] = write_plots(report, Path(options.plot_dir))
    return report


def _mesh(report: dict, values: list[float]) -> np.ndarray:
    chip = report["chip"]
    across, down = chip_grid(chip)
    grid = np.zeros((down * chip["rows"], across * chip["columns"]))
    for core, value in enumerate(values):
        x, y = core_xy(chip, core)
        grid[y, x] = value
    return grid


def write_plots(report: dict, folder: Path) -> list[str]:
    """The mesh heat maps and the energy bars as PNG files in ``folder``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    chip = report["chip"]
    for name, values, label in (("utilisation.png", report["utilisation"], "busy fraction of the token's latency"),
                                ("memory.png", report["memory_fill"], "fraction of core memory filled")):
        grid = _mesh(report, values)
        scale = min(0.45, 8.0 / max(grid.shape))  # inches per core, at most 8 inches of mesh
        figure, axes = plt.subplots(figsize=(max(4, grid.shape[1] * scale + 2), max(2.5, grid.shape[0] * scale + 1.5)))
        image = axes.imshow(grid, cmap="viridis", vmin=0, vmax=max(1e-9, grid.max()))
        across, down = chip_grid(chip)
        for boundary in range(1, across):
            axes.axvline(boundary * chip["columns"] - 0.5, color="white", linewidth=2)
        for boundary in range(1, down):
            axes.axhline(boundary * chip["rows"] - 0.5, color="white", linewidth=2)
        axes.set_title(f"{chip['name']} x{chip['chips']}: {label}", fontsize=9)
        axes.set_xlabel("mesh x")
        axes.set_ylabel("mesh y")
        figure.colorbar(image, ax=axes)
        figure.tight_layout()
        written.append(_save(figure, folder / name))
        plt.close(figure)
    figure, axes = plt.subplots(figsize=(6, 3.5))
    positions = np.arange(len(COMPONENTS))
    ours = [report["energy_by_component"][c] * 1e6 for c in COMPONENTS]
    dense = [report["dense_equivalent"]["energy_by_component"][c] * 1e6 for c in COMPONENTS]
    axes.bar(positions - 0.2, ours, 0.4, label="event-driven")
    axes.bar(positions + 0.2, dense, 0.4, label="dense equivalent")
    axes.set_xticks(positions, [c.replace("_", " ") for c in COMPONENTS], rotation=30, fontsize=8)
    axes.set_ylabel("uJ per token")
    axes.legend()
    figure.tight_layout()
    written.append(_save(figure, folder / "energy.png"))
    plt.close(figure)
    return written


def _save(figure, path: Path) -> str:
    temporary = path.with_name(f".{path.name}.partial.png")
    figure.savefig(temporary, dpi=110)
    temporary.replace(path)
    return str(path)


def describe(report: dict) -> list[str]:
    """Lines for a person reading the profile."""
    chip = report["chip"]
    dense = report["dense_equivalent"]
    lines = [
        f"neuromorphic profile on {chip['name']} x{chip['chips']} ({report['cores_used']} of "
        f"{chip['cores_per_chip'] * chip['chips']} cores used, {report['steps']} timesteps per token), "
        f"per token over {report['tokens']} token(s):",
        f"  latency          {report['latency_s'] * 1e6:10.2f} us   (dense equivalent {dense['latency_s'] * 1e6:.2f} us)",
        f"  energy           {report['energy_j'] * 1e6:10.3f} uJ   (dense equivalent {dense['energy_j'] * 1e6:.3f} uJ)",
    ]
    for component in COMPONENTS:
        share = report["energy_by_component"][component] / report["energy_j"] if report["energy_j"] else 0.0
        lines.append(f"    {component.replace('_', ' '):14} {report['energy_by_component'][component] * 1e6:10.3f} uJ  {share:6.1%}")
    busy = [u for u in report["utilisation"] if u > 0]
    fill = [f for f in report["memory_fill"] if f > 0]
    lines += [
        f"  synaptic ops     {report['synaptic_ops']:12.0f}",
        f"  events           {report['events']:12.0f}   ({report['packets']:.0f} packets)",
        f"  utilisation      busiest core {max(busy, default=0):.1%}, mean of used cores {np.mean(busy) if busy else 0:.1%}",
        f"  memory fill      fullest core {max(fill, default=0):.1%}, mean of used cores {np.mean(fill) if fill else 0:.1%}",
        f"  bottleneck       {report['bottleneck']} (time by class: "
        + ", ".join(f"{k} {v * 1e6:.1f} us" for k, v in report["time_by_bottleneck_s"].items()) + ")",
    ]
    lines += [f"  plot             {path}" for path in report.get("plots", [])]
    return lines
