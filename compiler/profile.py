"""``sparsecc profile``: one verb, one profiler per target.

The artifact's manifest names its target; ``targets.<name>.profile.profile`` measures or
models it and returns a JSON-ready dict. Each target's profiler decides what it can say
(host time per operator on the CPU, a roofline estimate for CUDA, the event-driven
simulation for neuromorphic chips).
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass

from compiler.output_file import atomic_output, check_output_file
from runtime.artifact import read_manifest
from runtime.errors import SparseccError


@dataclass(frozen=True)
class ProfileOptions:
    """What ``sparsecc profile`` was asked for.

    Attributes:
        artifact: the artifact folder.
        hardware: hardware models to estimate on (names or .toml paths); empty for the
            target's default.
        json_path: write the full report as JSON here.
        report_dir: write a self-contained HTML report (with plots) here.
        plot_dir: write PNG plots here.
        inputs: input arrays to profile on; None for the target's default input.
    """

    artifact: str
    hardware: tuple[str, ...] = ()
    json_path: str | None = None
    report_dir: str | None = None
    plot_dir: str | None = None
    inputs: dict | None = None


def profile_artifact(options: ProfileOptions, progress) -> tuple[dict, list[str]]:
    """Profiles ``options.artifact`` with its target's profiler; writes JSON if asked.

    Returns the report and the lines to print for a person (the target module's
    ``describe(report)``).
    """
    if options.json_path:
        check_output_file(options.json_path)
    manifest = read_manifest(options.artifact)
    target = str(manifest.target.get("name"))
    try:
        module = importlib.import_module(f"targets.{target}.profile")
    except ModuleNotFoundError:
        raise SparseccError(f"profiling is not built yet for {target!r} artifacts (see the README's feature table).") from None
    report = module.profile(manifest, options, progress)
    if options.json_path:
        with atomic_output(options.json_path) as handle:
            handle.write((json.dumps(report, indent=2) + "\n").encode())
    return report, module.describe(report)
