"""Measures llama.cpp's SmolLM2 GGUF variants once, for ``docs/peers.json``, the README
and the frontier plot (after ``make bench-peers``):

    sparsecc export smollm2-135m --seq-len 512 -o smollm2-512.onnx
    python -m benchmarks.measure_peers --onnx smollm2-512.onnx --json docs/peers.json

Speed: ``llama-bench`` of every GGUF and build, in rounds alternating between them under
``bench decode``'s timing lock. Perplexity: ``llama-perplexity`` of every GGUF in both
conventions (``benchmarks.peers.perplexity_command``) and, with ``--onnx``, sparsecc's own
``eval`` of the dense model on the same windows in both, the reference the GGUFs compare
with. The CPU (lscpu), the load average around the timing and the date go with them.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys
from pathlib import Path

from benchmarks.bench_decode import _timing_lock
from benchmarks.peers import (
    BUILDS,
    LLAMA_CPP_PYTHON_VERSION,
    run_tool,
    cpu_has_amx,
    llama_cpp_available,
    llama_perplexity,
    parse_llama_bench_json,
    peer_name,
    tool_path,
)
from compiler.evaluate import SCORED
from compiler.progress import Progress
from runtime.errors import SparseccError


def _cpu_model() -> str:
    """lscpu's model name (or the platform's processor string where lscpu is absent)."""
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    except OSError:
        text = ""
    found = re.search(r"^Model name:\s*(.+)$", text, re.MULTILINE)
    return found.group(1).strip() if found else platform.processor()


def measure(text_file: str, onnx_path: str | None, rounds: int, tokens: int, threads: int,
            window: int = 512, windows: int = 8) -> dict:
    """The figures of ``docs/peers.json``: llama-bench tokens/s of every GGUF and build
    (``rounds`` rounds alternating between them, ``-r 3`` each, median of all samples) and
    llama-perplexity of every GGUF in both conventions; with ``onnx_path`` (a SmolLM2
    export of sequence length ``window``) sparsecc's ``eval`` of it in both conventions on
    the same windows, the reference the GGUFs' figures compare with."""
    from compiler.evaluate import perplexity

    found = llama_cpp_available()
    if isinstance(found, str):
        raise SparseccError(found)
    samples: dict[tuple[str, str], list[float]] = {(t, k): [] for k in found.builds for t in found.ggufs}
    with _timing_lock(Progress()):
        load_before = os.getloadavg()
        for index in range(rounds):
            print(f"llama-bench round {index + 1}/{rounds}")
            for (gguf_type, kind), values in samples.items():
                command = [str(tool_path("llama-bench", BUILDS[kind])), "-m", str(found.ggufs[gguf_type]),
                           "-t", str(threads), "-p", "0", "-n", str(tokens), "-r", "3", "-o", "json"]
                values += parse_llama_bench_json(run_tool(command, f"llama-bench on {gguf_type}").stdout)
        load_after = os.getloadavg()
    rows = []
    for gguf_type, gguf in found.ggufs.items():
        row = {"gguf": gguf_type, "file_mb": gguf.stat().st_size / 1e6,
               **{f"tokens_per_s_{kind}": float(statistics.median(samples[gguf_type, kind])) for kind in found.builds},
               **{f"samples_tokens_per_s_{kind}": samples[gguf_type, kind] for kind in found.builds}}
        for scored in SCORED:
            print(f"llama-perplexity {gguf_type}, {scored} scored")
            row[f"perplexity_{scored}"] = llama_perplexity(gguf, text_file, window, windows, threads, scored)
        rows.append(row)
    reference = {}
    if onnx_path:
        for scored in SCORED:
            print(f"sparsecc eval {onnx_path}, {scored} scored")
            report = perplexity(onnx_path, text_file, window * windows, scored=scored)
            reference[scored] = {key: report[key] for key in ("perplexity", "tokens", "windows", "window", "engine")}
    root = Path(__file__).resolve().parent.parent
    shown = Path(text_file).resolve()
    text_file = str(shown.relative_to(root)) if shown.is_relative_to(root) else str(shown)
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "cpu": _cpu_model(), "cpu_has_amx": cpu_has_amx(), "threads": threads,
        "load_average_before_after_timing": [load_before[0], load_after[0]],
        "llama_cpp": f"vendored in llama-cpp-python {LLAMA_CPP_PYTHON_VERSION}, built with -DGGML_NATIVE=ON",
        "speed": f"llama-bench -t {threads} -p 0 -n {tokens} -r 3 -o json, {rounds} rounds alternating between "
                 f"the variants; median of all samples (batch 1, from an empty context)",
        "corpus": text_file,
        "note": (f"llama.cpp {LLAMA_CPP_PYTHON_VERSION} native build, llama-bench tg{tokens}; perplexity of "
                 f"{windows} x {window} tokens of {text_file}, every token scored"),
        "perplexity_convention": (f"first {windows} windows of {window} tokens of {text_file}, no BOS (SmolLM2 asks for none); "
                                  f"'all' scores every token but each window's first (sparsecc eval's convention; "
                                  f"llama.cpp's windows start {window - 1} apart, sparsecc's {window}), "
                                  f"'second-half' the targets at {window // 2 + 1}..{window - 1} (llama.cpp's default; "
                                  f"sparsecc eval --score second-half)"),
        "results": rows, "sparsecc_dense_reference": reference,
        # For benchmarks/frontier.py: the native build's speed, sparsecc's convention.
        "points": [{"name": peer_name(row["gguf"], "native"), "kind": "peer", "tokens_per_s": row["tokens_per_s_native"],
                    "perplexity": row["perplexity_all"]["perplexity"]} for row in rows],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--text", default=str(Path(__file__).resolve().parent.parent / "data" / "pride_and_prejudice.txt"),
                        help="Text for the perplexity.")
    parser.add_argument("--onnx", help="A SmolLM2 export of sequence length 512 (sparsecc export smollm2-135m "
                                       "--seq-len 512) for sparsecc's perplexity on the same windows.")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--json", help="Write the figures here (docs/peers.json).")
    args = parser.parse_args(argv)
    try:
        report = measure(args.text, args.onnx, args.rounds, args.tokens, args.threads)
    except SparseccError as error:
        print(f"measure_peers: {error}", file=sys.stderr)
        return 1
    text = json.dumps(report, indent=2) + "\n"
    if args.json:
        Path(args.json).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
