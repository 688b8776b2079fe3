"""Calibration memory: ``sparsecc sparsify`` on SmolLM2-135M (seq-512 export) with 64 x 512
calibration tokens, for the methods that keep statistics (wanda, teal).

Each method runs in a fresh process, so its peak RSS (``ru_maxrss``, which
``/usr/bin/time -v`` reports too) is its own. The corpus is ``pydoc`` (113k tokens):
``data/emma.txt`` has 30,667, fewer than 64 windows. The figures go under
``calibration_memory`` in ``docs/accuracy.json``; the goal is under 6 GB.

    python benchmarks/calibration_memory.py --workdir /tmp/accuracy
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from compiler.export import ExportOptions, export  # noqa: E402
from compiler.progress import Progress  # noqa: E402

METHODS = (("wanda:0.5", None), (None, "teal:0.4"))
GOAL_GB = 6.0
CHILD = """
import json, resource, sys
from compiler.progress import Progress
from sparsify.run import SparsifyOptions, sparsify
model, output, weights, activations, calib, tokens, report = sys.argv[1:]
summary = sparsify(SparsifyOptions(model, output, weights or None, activations or None, calib, int(tokens)), Progress())
open(report, "w").write(json.dumps({"seconds": summary["seconds"],
                                    "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="/tmp/sparsecc-accuracy")
    parser.add_argument("--json", default=str(ROOT / "docs" / "accuracy.json"))
    parser.add_argument("--calib", default="pydoc")
    parser.add_argument("--calib-tokens", type=int, default=64 * 512)
    args = parser.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    dense = work / "smollm2-512.onnx"
    if not dense.exists():
        export(ExportOptions("smollm2-135m", str(dense), 0.0, 1, 512, False, 0), Progress())
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    results = []
    for weights, activations in METHODS:
        output, report = work / "memory-check.onnx", work / "memory-check.json"
        command = [sys.executable, "-c", CHILD, str(dense), str(output), weights or "", activations or "", args.calib,
                   str(args.calib_tokens), str(report)]
        if subprocess.run(command, env=env, cwd=ROOT).returncode != 0:
            sys.exit(f"sparsify {weights or activations} failed (its output is above).")
        found = json.loads(report.read_text())
        for path in (report, output, output.with_name(output.name + ".data")):
            path.unlink(missing_ok=True)
        row = {"method": weights or activations, **found, "under_goal": found["peak_rss_gb"] < GOAL_GB}
        print(json.dumps(row), flush=True)
        results.append(row)
    path = Path(args.json)
    stored = json.loads(path.read_text()) if path.exists() else {}
    stored["calibration_memory"] = {"model": "smollm2-135m", "seq_len": 512, "calib": args.calib,
                                    "calib_tokens": args.calib_tokens, "goal_gb": GOAL_GB, "results": results}
    path.write_text(json.dumps(stored, indent=2) + "\n")


if __name__ == "__main__":
    main()
