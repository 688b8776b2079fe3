"""The accuracy table: SmolLM2-135M sparsified by every method, perplexity on Pride and Prejudice.

Calibration on another novel (the first 120 KB of Emma, ``data/emma.txt``), evaluation on
the first 4096 tokens of ``data/pride_and_prejudice.txt`` in onnxruntime, one process,
seed 0. Peak memory is this process's (the calibration runs in it), so with several rows
it is the peak so far.

    python benchmarks/accuracy.py --workdir /tmp/accuracy --json docs/accuracy.json
    python benchmarks/accuracy.py --only dynk     # just the rows whose label starts so

``--only`` runs the matching rows (and the dense row when the JSON has none, for the
ratio) and merges them into the existing JSON, replacing rows of the same label.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from compiler.evaluate import perplexity  # noqa: E402
from compiler.export import ExportOptions, export  # noqa: E402
from compiler.progress import Progress  # noqa: E402
from compiler.sparsify import SparsifyOptions, sparsify  # noqa: E402

ROWS = [
    ("dense", None, None),
    ("magnitude 50 %", "magnitude:0.5", None),
    ("wanda 50 %", "wanda:0.5", None),
    ("wanda 2:4", "wanda:2:4", None),
    ("seap 20 %", "seap:0.2", None),
    ("seap 50 %", "seap:0.5", None),
    ("functional 20 %", "functional:0.2", None),
    ("teal 25 %", None, "teal:0.25"),
    ("teal 40 %", None, "teal:0.4"),
    ("teal 50 %", None, "teal:0.5"),
    ("cats 50 %", None, "cats:0.5"),
    ("dynk, 50 % of experts", None, "dynk:0.5"),
    ("wanda 50 % + teal 40 %", "wanda:0.5", "teal:0.4"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="/tmp/sparsecc-accuracy")
    parser.add_argument("--json", default=str(ROOT / "docs" / "accuracy.json"))
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--calib-tokens", type=int, default=2048)
    parser.add_argument("--only", action="append", metavar="PREFIX",
                        help="Run only the rows whose label starts with PREFIX (repeatable); merge into --json.")
    args = parser.parse_args()
    previous = {}
    if args.only and Path(args.json).exists():
        previous = {row["row"]: row for row in json.loads(Path(args.json).read_text())["rows"]}
    chosen = [row for row in ROWS if not args.only or any(row[0].startswith(p) for p in args.only)
              or (row[0] == "dense" and "dense" not in previous)]
    if not chosen:
        parser.error(f"no row starts with {', '.join(args.only)}; the rows are: {', '.join(r[0] for r in ROWS)}")
    progress = Progress()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    dense = work / "smollm2-512.onnx"
    if not dense.exists():
        export(ExportOptions("smollm2-135m", str(dense), 0.0, 1, 512, False, 0), progress)
    calib, corpus = str(ROOT / "data" / "emma.txt"), str(ROOT / "data" / "pride_and_prejudice.txt")
    results = dict(previous)
    for label, weights, activations in chosen:
        index = next(i for i, row in enumerate(ROWS) if row[0] == label)
        path, summary = dense, {}
        if weights or activations:
            path = work / f"row{index}.onnx"
            summary = sparsify(SparsifyOptions(str(dense), str(path), weights, activations, calib, args.calib_tokens, 0), progress)
        ppl = perplexity(str(path), corpus, args.tokens, progress)
        gates = summary.get("activation_sparsity", {}).get("measured", {})
        row = {"row": label, "weights": weights, "activations": activations, "perplexity": ppl["perplexity"],
               "tokens": ppl["tokens"], "weight_sparsity": summary.get("weight_sparsity", {}).get("sparsity", 0.0),
               "gate_zeros_measured": (sum(gates.values()) / len(gates)) if gates else None,
               "sparsify_seconds": summary.get("seconds"),
               "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
        if activations and activations.startswith("dynk"):
            row["experts_skipped_calibrated"] = summary["activation_sparsity"]["sparsity"]
        results[label] = row
        print(json.dumps(row), flush=True)
        ordered = [results[r[0]] for r in ROWS if r[0] in results]
        Path(args.json).write_text(json.dumps({"calibration": "data/emma.txt", "corpus": "data/pride_and_prejudice.txt",
                                               "tokens": args.tokens, "calib_tokens": args.calib_tokens, "rows": ordered}, indent=2) + "\n")
    results = [results[r[0]] for r in ROWS if r[0] in results]
    base = results[0]["perplexity"]
    print("| model | weight sparsity | gate zeros (measured) | perplexity | vs dense |\n|---|---|---|---|---|")
    for row in results:
        gate = f"{row['gate_zeros_measured']:.1%}" if row["gate_zeros_measured"] is not None else ""
        print(f"| {row['row']} | {row['weight_sparsity']:.1%} | {gate} | {row['perplexity']:.2f} | {row['perplexity'] / base:.2f}x |")


if __name__ == "__main__":
    main()
