"""The speed-quality frontier: perplexity against decode tokens/s, sparsecc and its peers.

    python -m benchmarks.frontier docs/accuracy.json docs/peers.json -o docs/frontier.png

Each JSON file gives points, merged by name in the order the files come (a later file's
fields override an earlier one's, so one file can give a point's speed and another its
perplexity); a point needs both to be drawn, and those without are listed. A file is one of:

- a list of points ``{"points": [{"name", "tokens_per_s", "perplexity", "kind"}]}``, kind
  ``sparsecc`` or ``peer`` (``docs/peers.json`` is one);
- the accuracy table (``benchmarks/accuracy.py``): each row with a decode speed is a
  sparsecc point, and the dense model on onnxruntime, timed in the same rounds, a peer;
- the report of ``sparsecc bench decode``: its peer rows (``peers``) give llama.cpp's
  tokens/s, under the same names as ``docs/peers.json`` gives their perplexity.

A point is better the further right (faster) and lower (more faithful); the y axis is
logarithmic because pruned models span orders of magnitude of perplexity. Points compare
only as far as their sources do: each file's speeds come from its own run, and its figures
from its own perplexity convention, which the caption lists.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from runtime.errors import SparseccError

KINDS = ("sparsecc", "peer")


def points_of(report: dict) -> list[dict]:
    """The (partial) points a JSON report gives: name, kind and whichever of
    ``tokens_per_s`` and ``perplexity`` it holds."""
    if "points" in report:
        return [dict(point) for point in report["points"]]
    if "peers" in report and "results" in report:  # sparsecc bench decode
        return [{"name": row["variant"], "kind": "peer", "tokens_per_s": row["tokens_per_s"]} for row in report["peers"]]
    if "rows" in report:  # the accuracy table
        points = [{"name": f"sparsecc {row['row']}", "kind": "sparsecc", "tokens_per_s": row["ours_tokens_per_s"],
                   "perplexity": row["perplexity"]} for row in report["rows"] if row.get("ours_tokens_per_s")]
        dense = next((row for row in report["rows"] if row["row"] == "dense"), None)
        if dense and dense.get("onnxruntime_dense_tokens_per_s"):
            points.append({"name": "onnxruntime dense fp32", "kind": "peer",
                           "tokens_per_s": dense["onnxruntime_dense_tokens_per_s"], "perplexity": dense["perplexity"]})
        return points
    raise SparseccError("a frontier input must hold 'points', an accuracy table's 'rows', "
                        "or a bench decode report with 'peers'.")


def merge_points(reports: list[dict]) -> tuple[list[dict], list[str]]:
    """(points with both speed and perplexity, names of the points missing one)."""
    merged: dict[str, dict] = {}
    for report in reports:
        for point in points_of(report):
            if point.get("kind", "sparsecc") not in KINDS:
                raise SparseccError(f"point {point.get('name')!r} has kind {point['kind']!r}; choose sparsecc or peer.")
            merged.setdefault(point["name"], {}).update(point)
    drawable = {name: bool(p.get("tokens_per_s") and p.get("perplexity")) for name, p in merged.items()}
    return [merged[name] for name, ok in drawable.items() if ok], [name for name, ok in drawable.items() if not ok]


def draw(points: list[dict], output: str, caption: str = "") -> None:
    """Writes the frontier plot of ``points`` to ``output`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not points:
        raise SparseccError("no point has both a decode speed and a perplexity; nothing to draw.")
    figure, axes = plt.subplots(figsize=(9, 6))
    style = {"sparsecc": {"marker": "o", "color": "tab:blue", "label": "sparsecc"},
             "peer": {"marker": "s", "color": "tab:red", "label": "peers (llama.cpp, onnxruntime)"}}
    for kind in KINDS:
        chosen = [p for p in points if p.get("kind", "sparsecc") == kind]
        if chosen:
            axes.scatter([p["tokens_per_s"] for p in chosen], [p["perplexity"] for p in chosen], s=40, **style[kind])
        # Labels alternate above and below their points in order of speed, so neighbours
        # of nearly equal speed and quality (Q8_0 and Q4_1) stay readable. The marker says
        # which kind a point is; the label need not repeat it.
        for index, point in enumerate(sorted(chosen, key=lambda p: p["tokens_per_s"])):
            axes.annotate(point["name"].removeprefix("sparsecc "), (point["tokens_per_s"], point["perplexity"]),
                          fontsize=7, xytext=(4, 3 if index % 2 == 0 else -10), textcoords="offset points")
    axes.set_yscale("log")
    axes.set_xlabel("decode tokens/s (batch 1; faster is right)")
    axes.set_ylabel("perplexity (log scale; better is down)")
    axes.set_title("SmolLM2-135M: quality against decode speed")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(loc="center left")
    # Room on the right for the fastest points' labels.
    fastest = max(p["tokens_per_s"] for p in points)
    axes.set_xlim(right=fastest * 1.35)
    if caption:
        figure.text(0.01, 0.01, caption, fontsize=7, va="bottom", wrap=True)
        figure.subplots_adjust(bottom=0.18)
    figure.savefig(output, dpi=120)
    plt.close(figure)


def caption_of(paths: list[str], reports: list[dict]) -> str:
    """One line per input: its file and, where it says, when, where and how it measured."""
    lines = []
    for path, report in zip(paths, reports):
        timed = sorted({row["timed_at"] for row in report.get("rows", []) if row.get("timed_at")})
        facts = [str(report[key]) for key in ("cpu", "date", "note", "corpus") if report.get(key)]
        facts += [f"timed {', '.join(timed)}"] if timed else []
        lines.append(f"{path}" + (f": {'; '.join(facts)}" if facts else ""))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("inputs", nargs="+", help="JSON files of points (see the module docstring).")
    parser.add_argument("-o", "--output", default="docs/frontier.png", help="PNG to write.")
    args = parser.parse_args(argv)
    try:
        reports = []
        for path in args.inputs:
            try:
                reports.append(json.loads(Path(path).read_text()))
            except (OSError, ValueError) as exc:
                raise SparseccError(f"{path} is not a readable JSON file ({exc.__class__.__name__}).") from None
        points, incomplete = merge_points(reports)
        draw(points, args.output, caption_of(args.inputs, reports))
    except SparseccError as error:
        print(f"frontier: {error}", file=sys.stderr)
        return 1
    if incomplete:
        print(f"left out (no speed or no perplexity): {', '.join(incomplete)}")
    print(f"wrote {args.output} ({len(points)} points)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
