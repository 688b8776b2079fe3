"""The accuracy table: SmolLM2-135M sparsified by every method, perplexity on Pride and Prejudice.

Calibration on another novel (the first 120 KB of Emma, ``data/emma.txt``), evaluation on
the first 4096 tokens of ``data/pride_and_prejudice.txt`` in onnxruntime, one process,
seed 0. Peak memory is this process's (the calibration runs in it), so with several rows
it is the peak so far.

With ``--speed``, each row is also compiled and timed at decode, where its sparse and
gated kernels run (a 512-token prompt runs the dense kernels): SmolLM2 is exported with
``--decode`` (a cache of ``--max-context`` tokens), the row's sparsified seq-512 model is
copied onto it (``sparsecc sparsify --like``) and compiled for the CPU in a subprocess
(so its several GB are returned before the next row), one row at a time. Then the greedy
decode tokens/s of all the rows' artifacts and of onnxruntime on the dense decode graph
are timed in this process, in the same rounds, alternating, median of the rounds
(``benchmarks.bench_decode.time_decoding``), and the artifacts deleted. Each artifact's
tokens are checked against onnxruntime running the row's sparsified decode graph.

    python benchmarks/accuracy.py --workdir /tmp/accuracy --json docs/accuracy.json
    python benchmarks/accuracy.py --speed --merge --rows "dense,wanda 50 %"   # add speed to two rows
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from compiler.evaluate import perplexity  # noqa: E402
from compiler.export import ExportOptions, export  # noqa: E402
from compiler.progress import Progress  # noqa: E402
from sparsify.run import SparsifyOptions, sparsify  # noqa: E402

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


def choose_rows(text: str | None) -> list[int]:
    """Indices into ROWS of ``--rows`` (labels or indices, comma-separated); all by default."""
    if not text:
        return list(range(len(ROWS)))
    labels = [label for label, _, _ in ROWS]
    chosen = []
    for item in (part.strip() for part in text.split(",")):
        if item.isdigit() and int(item) < len(ROWS):
            chosen.append(int(item))
        elif item in labels:
            chosen.append(labels.index(item))
        else:
            sys.exit(f"--rows: unknown row {item!r}; the rows are {', '.join(map(repr, labels))} (or their indices).")
    return chosen


def compile_in_subprocess(onnx_path: Path, artifact: Path) -> dict:
    """``sparsecc compile`` (cpu) in a fresh process; its seconds and peak RSS."""
    report = artifact.with_name(artifact.name + ".json")
    code = ("import json, resource, sys; from compiler.driver import CompileOptions, compile_model; "
            "from compiler.progress import Progress; "
            "s = compile_model(CompileOptions(sys.argv[1], sys.argv[2]), Progress()); "
            "open(sys.argv[3], 'w').write(json.dumps({'compile_seconds': s['seconds'], "
            "'compile_peak_rss_gb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, "-c", code, str(onnx_path), str(artifact), str(report)], env=env, cwd=ROOT)
    if result.returncode != 0:
        sys.exit(f"compiling {onnx_path} failed (exit code {result.returncode}; its output is above).")
    found = json.loads(report.read_text())
    report.unlink()
    return found


def remove_export(path: Path) -> None:
    """Deletes an ONNX file with its weights, prefill graph and tokenizer, or an artifact."""
    stem = path.name[:-5] if path.name.endswith(".onnx") else path.name
    for victim in (path, path.with_name(path.name + ".data"), path.with_name(f"{stem}.prefill.onnx"),
                   path.with_name(f"{stem}.prefill.onnx.data"), path.with_name(f"{stem}.tokenizer.json")):
        if victim.is_dir():
            shutil.rmtree(victim)
        elif victim.exists():
            victim.unlink()


def _onnxruntime_decoder(path: Path):
    import onnx

    from benchmarks.bench_decode import OnnxRuntimeDecoder
    from compiler.decode_export import decoding_metadata

    return OnnxRuntimeDecoder(path, decoding_metadata(onnx.load(str(path), load_external_data=False)))


def _prompt() -> list[int]:
    from benchmarks.bench_decode import PROMPT
    from compiler.export import load_tokenizer

    return load_tokenizer("smollm2-135m")(PROMPT)["input_ids"]


def build_row(dense_decode: Path, sparsified: Path | None, stem: Path, args, progress: Progress) -> dict:
    """Compiles a row's decoder into ``STEM-decode.sccx`` and runs the row's sparsified
    decode graph in onnxruntime for the tokens the artifact should give. Each row has its
    own artifact path: a process keeps the first library it loaded from a path."""
    decode = dense_decode
    if sparsified is not None:
        decode = stem.with_name(f"{stem.name}-decode.onnx")
        sparsify(SparsifyOptions(str(dense_decode), str(decode), like=str(sparsified)), progress)
    artifact = stem.with_name(f"{stem.name}-decode.sccx")
    with progress.step(f"compiling {decode} (in a subprocess)"):
        built = compile_in_subprocess(decode, artifact)
    with progress.step("onnxruntime on the row's sparsified decode graph (the tokens to expect)"):
        expected = _onnxruntime_decoder(decode).generate(_prompt(), args.new_tokens)[0]
    if decode != dense_decode:
        remove_export(decode)
    gc.collect()
    return {"artifact": artifact, "expected": expected, **built}


def time_rows(dense_decode: Path, built: dict[str, dict], args, progress: Progress) -> dict[str, dict]:
    """Times every built row and onnxruntime on the dense decode graph in the same rounds
    (``benchmarks.bench_decode.time_decoding``); deletes the artifacts; the speed per row."""
    import time

    import runtime
    from benchmarks.bench_decode import generate_compiled, time_decoding

    prompt = _prompt()
    models = {label: runtime.load(entry["artifact"]) for label, entry in built.items()}
    onnxruntime = _onnxruntime_decoder(dense_decode)
    runs = {"onnxruntime dense": lambda: onnxruntime.generate(prompt, args.new_tokens)}
    runs.update({label: (lambda m=model: generate_compiled(m, prompt, args.new_tokens)) for label, model in models.items()})
    # The machine may be shared: its load while timing is kept with the figures.
    load_before = os.getloadavg()[0]
    tokens, medians = time_decoding(runs, args.rounds, args.new_tokens, progress)
    timing = {"timed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "timed_together": list(runs),
              "load_average_before_after_timing": [load_before, os.getloadavg()[0]]}
    del models, runs
    gc.collect()
    speeds = {}
    for label, entry in built.items():
        remove_export(entry["artifact"])
        expected = entry["expected"]
        speeds[label] = {
            "speed_vs_dense_onnxruntime": medians[label] / medians["onnxruntime dense"],
            "ours_tokens_per_s": medians[label], "onnxruntime_dense_tokens_per_s": medians["onnxruntime dense"],
            "same_tokens_as_onnxruntime_sparsified": tokens[label] == expected,
            "first_token_differing_from_onnxruntime_sparsified":
                next((i for i, (a, b) in enumerate(zip(tokens[label], expected)) if a != b), None),
            "compile_seconds": entry["compile_seconds"], "compile_peak_rss_gb": entry["compile_peak_rss_gb"], **timing}
    return speeds


def write_table(path: str, stored: dict, results: dict[str, dict], args) -> None:
    """Writes the rows in table order; other keys of ``stored`` (calibration_memory.py's) stay."""
    ordered = [results[name] for name, _, _ in ROWS if name in results]
    speed = {"max_context": args.max_context, "rounds": args.rounds, "new_tokens": args.new_tokens,
             "threads": os.cpu_count(), "target": "cpu"}
    Path(path).write_text(json.dumps({**stored, "calibration": "data/emma.txt", "corpus": "data/pride_and_prejudice.txt",
                                      "tokens": args.tokens, "calib_tokens": args.calib_tokens,
                                      "speed": speed if args.speed else stored.get("speed"), "rows": ordered}, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="/tmp/sparsecc-accuracy")
    parser.add_argument("--json", default=str(ROOT / "docs" / "accuracy.json"))
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--calib-tokens", type=int, default=2048)
    parser.add_argument("--rows", help="Only these rows: labels or indices, comma-separated (default: all).")
    parser.add_argument("--merge", action="store_true",
                        help="Update the rows of the existing --json file; a row's perplexity already there is kept, not recomputed.")
    parser.add_argument("--speed", action="store_true", help="Also compile each row and time its decode against onnxruntime.")
    parser.add_argument("--max-context", type=int, default=256, help="With --speed: the decode export's cache size.")
    parser.add_argument("--rounds", type=int, default=7, help="With --speed: timed rounds (the median is reported).")
    parser.add_argument("--new-tokens", type=int, default=32, help="With --speed: tokens generated per round.")
    args = parser.parse_args()
    progress = Progress()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    dense = work / "smollm2-512.onnx"
    if not dense.exists():
        export(ExportOptions("smollm2-135m", str(dense), 0.0, 1, 512, False, 0), progress)
    dense_decode = work / f"decode{args.max_context}" / "smollm2-decode.onnx"
    if args.speed and not dense_decode.exists():
        export(ExportOptions("smollm2-135m", str(dense_decode), decode=True, max_context=args.max_context), progress)
    calib, corpus = str(ROOT / "data" / "emma.txt"), str(ROOT / "data" / "pride_and_prejudice.txt")
    previous, stored = {}, {}
    if args.merge and Path(args.json).exists():
        stored = json.loads(Path(args.json).read_text())
        if (stored["tokens"], stored["calib_tokens"]) != (args.tokens, args.calib_tokens):
            sys.exit(f"--merge: {args.json} has {stored['tokens']} tokens and {stored['calib_tokens']} calibration tokens, "
                     f"not {args.tokens} and {args.calib_tokens}.")
        previous = {row["row"]: row for row in stored["rows"]}
    results, built = dict(previous), {}
    for index in choose_rows(args.rows):
        label, weights, activations = ROWS[index]
        path, summary = dense, {}
        if weights or activations:
            path = work / f"row{index}.onnx"
            summary = sparsify(SparsifyOptions(str(dense), str(path), weights, activations, calib, args.calib_tokens, 0), progress)
        gates = summary.get("activation_sparsity", {}).get("measured", {})
        row = {"row": label, "weights": weights, "activations": activations,
               "weight_sparsity": summary.get("weight_sparsity", {}).get("sparsity", 0.0),
               "gate_zeros_measured": (sum(gates.values()) / len(gates)) if gates else None,
               "sparsify_seconds": summary.get("seconds")}
        if activations and activations.startswith("dynk"):
            row["experts_skipped_calibrated"] = summary["activation_sparsity"]["sparsity"]
        old = previous.get(label, {})
        if old.get("perplexity") is not None:
            if abs(old["weight_sparsity"] - row["weight_sparsity"]) > 1e-9:
                sys.exit(f"{label}: the sparsified model differs from the one {args.json} measured "
                         f"(weight sparsity {row['weight_sparsity']} against {old['weight_sparsity']}); run without --merge.")
            row = {**old, **row, "sparsify_seconds": old.get("sparsify_seconds"), "peak_rss_gb": old.get("peak_rss_gb")}
        else:
            ppl = perplexity(str(path), corpus, args.tokens, progress)
            row.update({"perplexity": ppl["perplexity"], "tokens": ppl["tokens"],
                        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20})
        del summary
        gc.collect()
        if args.speed:
            built[label] = build_row(dense_decode, path if path != dense else None, work / f"row{index}", args, progress)
        if path != dense:
            remove_export(path)
        results[label] = row
        print(json.dumps(row), flush=True)
        write_table(args.json, stored, results, args)
    if built:
        for label, speed in time_rows(dense_decode, built, args, progress).items():
            results[label].update(speed)
            print(json.dumps(results[label]), flush=True)
        write_table(args.json, stored, results, args)
    ordered = [results[name] for name, _, _ in ROWS if name in results]
    base = next((row["perplexity"] for row in ordered if row["row"] == "dense"), None)
    print("| model | weight sparsity | gate zeros (measured) | perplexity | vs dense | decode vs dense onnxruntime |\n"
          "|---|---|---|---|---|---|")
    for row in ordered:
        gate = f"{row['gate_zeros_measured']:.1%}" if row["gate_zeros_measured"] is not None else ""
        ratio = f"{row['perplexity'] / base:.2f}x" if base else ""
        speed = f"{row['speed_vs_dense_onnxruntime']:.2f}x" if row.get("speed_vs_dense_onnxruntime") else ""
        print(f"| {row['row']} | {row['weight_sparsity']:.1%} | {gate} | {row['perplexity']:.2f} | {ratio} | {speed} |")


if __name__ == "__main__":
    main()
