"""``sparsecc bench decode``: SmolLM2-135M decode tokens per second, batch 1.

Nine variants, measured in one process and one run:

- transformers eager (what a user runs by default; its own KV cache),
- onnxruntime on our dense decode graph (the same loop as ours: prefill graph, then the
  decode step with the cache in numpy arrays), and on those graphs quantized by its own
  4-bit tool (``matmul_nbits_graphs``),
- ours dense,
- ours with 50 % unstructured magnitude pruning and 40 % activation sparsity,
- ours with 70 % 16x1-block magnitude pruning and 50 % activation sparsity
  (gates calibrated on pydoc text),
- ours with int8 weights (``--weight-dtype int8``, as llama.cpp's Q8_0),
- ours with int4 layers and the int8 tied table (``--weight-dtype int4
  --weight-dtype-for lm_head.weight=int8``: exactly the weights of SmolLM2's shipped
  Q4_1 GGUF, whose table is Q8_0),
- ours with symmetric int4 layers and the int8 table (as llama.cpp's Q4_0).

Activations are float32 in every variant (the vnni path rounds them to int8 per group of
32 inside the int4 kernels and the int8 kernels above one row).

Where ``make bench-peers`` has built llama.cpp, its ``llama-bench`` on SmolLM2's F16, Q8_0,
Q4_1 and Q4_0 GGUFs (and the same without AMX on CPUs that list it) runs in the same
rounds, and every row's speed over each of them is reported (``benchmarks/peers.py``).

Every variant generates the same number of tokens greedily after the same prompt; only
the decode steps are timed. Rounds alternate between the variants, with a pause before
each so the previous runtime's spinning worker threads are idle, and the median of the
rounds is reported. SmolLM2's weights (540 MB) are far larger than the last-level cache,
so every step reads them from DRAM.

``ideal_speedup`` is the bytes of weights a token reads, dense over this variant: each
linear layer's bytes in its cheapest format (``sparsecc inspect``) times the fraction of
its inputs the gate keeps; the tied 576 x 49152 output projection stays dense and ungated
and bounds it; a quantized variant's layers read ``QUANT_BYTES`` per weight of its dtype.
The embedding lookup reads one row and is left out of both.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.peers import decode_peer_runs, describe_peers, peer_rows
from compiler.progress import Progress
from runtime.decoder import write_cache
from runtime.errors import SparseccError

PROMPT = "The history of the Python programming language"
SETTLE_SECONDS = 0.2
MAX_CONTEXT = 256
#: (variant, pruning, activation sparsity, weight dtype); pruning is None,
#: ("magnitude", level) or ("block", level) with 16x1 blocks (16 outputs that read one
#: input); the dtype is a ``formats.quant.WEIGHT_DTYPES`` name.
OURS = (
    ("ours dense", None, None, "fp32"),
    ("ours 50% unstructured + 40% activations", ("magnitude", 0.5), 0.4, "fp32"),
    ("ours 70% 16x1 blocks + 50% activations", ("block", 0.7), 0.5, "fp32"),
    ("ours int8 (as Q8_0)", None, None, "int8"),
    ("ours int4 + int8 table (the Q4_1 GGUF's own weights)", None, None, "int4"),
    ("ours int4sym + int8 table (as Q4_0)", None, None, "int4sym"),
)
#: The embedding table tied to the output projection: int8 beside int4 layers, as in
#: SmolLM2's shipped Q4_1 GGUF (whose token_embd is Q8_0). Re-quantizing the model that
#: transformers reads from that GGUF gives its weights back exactly (every layer's int4
#: codes and the table's int8 codes; ``tests/test_smollm2.py``).
TABLE = "lm_head.weight"
TABLE_DTYPE = {"int4": "int8", "int4sym": "int8"}
GOALS = {"ours dense": 1.0, "ours 50% unstructured + 40% activations": 1.4, "ours 70% 16x1 blocks + 50% activations": 2.2}
#: Bytes a quantized weight reads per value (codes and float16 parameters per group of 32).
QUANT_BYTES = {"fp32": 4.0, "int8": 1 + 2 / 32, "int4": 0.5 + 4 / 32, "int4sym": 0.5 + 2 / 32}


def _stem(pruning, dtype: str) -> str:
    """The file stem of a variant in the work folder; quantized ones share the dense export."""
    stem = {None: "dense", "magnitude": "unstructured50", "block": "block70"}[pruning[0] if pruning else None]
    return stem if dtype == "fp32" else f"{stem}-{dtype}"
BLOCK = 16
LOCK_FILE = "/tmp/sparsecc-bench.lock"


def prune_blocks(model, level: float, block: int = BLOCK) -> int:
    """Zeros ``level`` of each prunable layer's ``block`` x 1 blocks (``block`` outputs
    that read one input) with the smallest L1 norm, as ``torch.nn.utils.prune`` masks."""
    import torch
    import torch.nn.utils.prune as prune

    from compiler.export import prunable_layers

    count = 0
    for _, module in prunable_layers(model):
        weight = module.weight.detach()
        out_features, in_features = weight.shape
        if out_features % block:
            continue
        norms = weight.abs().reshape(out_features // block, block, in_features).sum(1)
        drop = int(round(level * norms.numel()))
        threshold = norms.flatten().kthvalue(drop).values if drop else -1.0
        keep = (norms > threshold).to(weight.dtype)
        prune.custom_from_mask(module, "weight", torch.repeat_interleave(keep, block, dim=0))
        count += 1
    return count


def build_variant(work: str, stem: str, pruning, activation: float | None, dtype: str = "fp32") -> None:
    """Exports and compiles one variant into ``work`` (skipping what exists)."""
    from compiler.decode_export import export_decoder
    from compiler.driver import CompileOptions, compile_model
    from compiler.export import load_torch_model, prune_magnitude, resolve_source

    progress = Progress()
    path = Path(work) / f"{_stem(pruning, 'fp32')}.onnx"
    if not path.exists():
        model = load_torch_model("smollm2-135m", progress=progress)
        if pruning and pruning[0] == "magnitude":
            prune_magnitude(model, pruning[1])
        elif pruning:
            prune_blocks(model, pruning[1])
        export_decoder(model, str(path), MAX_CONTEXT, 8, {"sparsecc.source": "smollm2-135m"},
                       Path(resolve_source("smollm2-135m", progress)), progress)
        del model
    artifact = Path(work) / f"{stem}.sccx"
    if not artifact.exists():
        compile_model(CompileOptions(str(path), str(artifact), activation_sparsity=activation,
                                     calib="pydoc" if activation else None, calib_tokens=1024, weight_dtype=dtype,
                                     weight_dtype_for={TABLE: TABLE_DTYPE[dtype]} if dtype in TABLE_DTYPE else {}),
                      progress)


def _build_in_subprocess(work: Path, stem: str, pruning, activation, dtype: str) -> None:
    """Builds a variant in a fresh process, so the export's and compiler's memory (several
    GB for SmolLM2) is returned before the next one and before the timing."""
    code = (f"from benchmarks.bench_decode import build_variant; "
            f"build_variant({str(work)!r}, {stem!r}, {pruning!r}, {activation!r}, {dtype!r})")
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, "-c", code], env=env, cwd=root)
    if result.returncode != 0:
        raise SparseccError(f"building the {stem} variant failed (exit code {result.returncode}; its output is above).")


def _ideal_bytes(onnx_path: Path, activation_sparsity: float | None, vocab_size: int,
                 dtype: str = "fp32") -> tuple[float, float]:
    """(dense bytes, this variant's bytes) of linear weights read per token; a quantized
    variant's layers are dense in its dtype."""
    from compiler.driver import inspect

    dense = variant = 0.0
    for layer in inspect(str(onnx_path))["layers"]:
        dense += layer["dense_bytes"]
        if dtype != "fp32":
            stored = TABLE_DTYPE.get(dtype, dtype) if layer["shape"][1] == vocab_size else dtype
            variant += layer["dense_bytes"] * QUANT_BYTES[stored] / 4
        elif layer["shape"][1] == vocab_size:
            variant += layer["dense_bytes"]  # the tied output projection: dense, ungated
        else:
            variant += min(layer["best_bytes"], layer["dense_bytes"]) * (1 - (activation_sparsity or 0.0))
    return dense, variant


def matmul_nbits_graphs(work: Path, dense_onnx: Path, spec: dict, progress: Progress) -> tuple[Path, dict]:
    """The dense decode and prefill graphs quantized by onnxruntime's own 4-bit tool
    (``MatMulNBitsQuantizer``, blocks of 32, symmetric, as ``docs`` of onnxruntime show it),
    written once into ``work``: (decode path, its spec). onnxruntime quantizes the
    ``MatMul`` nodes with initializer weights; the tied output projection reads its
    weight through a Transpose and stays float32 there."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    from compiler.onnx_io import load_model, save_model

    decode_path = work / "dense-nbits.onnx"
    nbits_spec = {**spec, "prefill_model": "dense-nbits.prefill.onnx"}
    for source, target in ((dense_onnx, decode_path), (dense_onnx.with_name(spec["prefill_model"]),
                                                       work / nbits_spec["prefill_model"])):
        if not target.exists():
            with progress.step(f"quantizing {source.name} with onnxruntime's MatMulNBitsQuantizer (int4, blocks of 32)"):
                quantizer = MatMulNBitsQuantizer(load_model(source), block_size=32, is_symmetric=True, bits=4)
                quantizer.process()
                save_model(quantizer.model.model, target)
    return decode_path, nbits_spec


class OnnxRuntimeDecoder:
    """Our decode loop on onnxruntime: the dense prefill and decode graphs, cache in numpy."""

    def __init__(self, decode_path: Path, spec: dict):
        import onnxruntime as ort

        import onnx

        options = ort.SessionOptions()
        options.intra_op_num_threads = os.cpu_count() or 1
        self.prefill = ort.InferenceSession(str(decode_path.with_name(spec["prefill_model"])), options,
                                            providers=["CPUExecutionProvider"])
        self.decode = ort.InferenceSession(str(decode_path), options, providers=["CPUExecutionProvider"])
        self.spec = spec
        self.cache = {value.name: np.zeros([d.dim_value for d in value.type.tensor_type.shape.dim], np.float32)
                      for value in onnx.load(str(decode_path), load_external_data=False).graph.input if value.name.startswith("past_")}

    def _step(self, session, ids: np.ndarray, position: int) -> np.ndarray:
        logits, keys, values = session.run(None, {"input_ids": ids, "position": np.array([position], np.int64), **self.cache})
        layers = range(self.spec["layers"])
        write_cache([self.cache[f"past_key_{i}"] for i in layers], [self.cache[f"past_value_{i}"] for i in layers],
                    keys, values, position, ids.shape[1])
        return logits[0]

    def generate(self, prompt: list[int], new_tokens: int) -> tuple[list[int], float]:
        length = self.spec["prefill_len"]
        for start in range(0, len(prompt), length):
            chunk = prompt[start:start + length]
            ids = np.zeros((1, length), np.int64)
            ids[0, :len(chunk)] = chunk
            last = self._step(self.prefill, ids, start)[len(chunk) - 1]
        tokens, seconds, position = [int(last.argmax())], 0.0, len(prompt)
        for _ in range(new_tokens - 1):
            begin = time.perf_counter()
            last = self._step(self.decode, np.array([[tokens[-1]]], np.int64), position)[0]
            seconds += time.perf_counter() - begin
            tokens.append(int(last.argmax()))
            position += 1
        return tokens, seconds


def _transformers_generate(model, prompt: list[int], new_tokens: int) -> tuple[list[int], float]:
    """Greedy decoding in transformers eager with its dynamic KV cache; decode steps timed."""
    import torch
    from transformers import DynamicCache

    with torch.no_grad():
        cache = DynamicCache()
        out = model(input_ids=torch.tensor([prompt]), past_key_values=cache, use_cache=True)
        tokens, seconds = [int(out.logits[0, -1].argmax())], 0.0
        for _ in range(new_tokens - 1):
            begin = time.perf_counter()
            out = model(input_ids=torch.tensor([[tokens[-1]]]), past_key_values=out.past_key_values, use_cache=True)
            seconds += time.perf_counter() - begin
            tokens.append(int(out.logits[0, -1].argmax()))
    return tokens, seconds


def generate_compiled(model, prompt: list[int], new_tokens: int) -> tuple[list[int], float]:
    """Greedy decoding with a loaded decoder artifact; (tokens, seconds of decode steps)."""
    tokens = list(model.generate_ids(prompt, new_tokens, stop_at_eos=False))
    return tokens, model.stats.decode_seconds


def time_decoding(runs: dict, rounds: int, new_tokens: int, progress: Progress) -> tuple[dict, dict]:
    """Times ``runs`` (name -> a call returning (tokens, decode seconds)) side by side:
    one warm-up each, then ``rounds`` rounds alternating between them, each after a pause
    so the previous runtime's spinning threads are idle, under the timing lock.

    Returns:
        (tokens of the warm-up, median decode tokens per second), per name.
    """
    tokens = {name: run()[0] for name, run in runs.items()}
    rates: dict[str, list[float]] = {name: [] for name in runs}
    with _timing_lock(progress), progress.step(f"timing {len(runs)} variants, {rounds} rounds of {new_tokens} tokens"):
        for _ in range(rounds):
            for name, run in runs.items():
                time.sleep(SETTLE_SECONDS)
                _, seconds = run()
                rates[name].append((new_tokens - 1) / seconds)
    return tokens, {name: float(np.median(values)) for name, values in rates.items()}


@contextlib.contextmanager
def _timing_lock(progress: Progress):
    """Holds ``LOCK_FILE`` while timing, so two benchmarks on a shared machine never time at
    once (the build before it needs no lock)."""
    import fcntl

    with open(LOCK_FILE, "a") as handle:
        progress(f"waiting for {LOCK_FILE}")
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def run_decode_bench(workdir: str, rounds: int, new_tokens: int, json_path: str | None, progress: Progress) -> dict:
    """Builds (once, cached in ``workdir``) and times the five variants; returns the report."""
    import torch

    import runtime
    from compiler.decode_export import decoding_metadata
    from compiler.export import load_tokenizer, load_torch_model
    from compiler.onnx_io import load_model

    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    models, ideal = {}, {}
    for name, pruning, activation, dtype in OURS:
        stem = _stem(pruning, dtype)
        onnx_path, artifact = work / f"{_stem(pruning, 'fp32')}.onnx", work / f"{stem}.sccx"
        if not artifact.exists():
            with progress.step(f"building {name} (export and compile, in a subprocess)"):
                _build_in_subprocess(work, stem, pruning, activation, dtype)
        models[name] = runtime.load(artifact)
        ideal[name] = _ideal_bytes(onnx_path, activation, models[name].vocab_size, dtype)
    dense_onnx = work / "dense.onnx"
    spec = decoding_metadata(load_model(dense_onnx))
    onnxruntime = OnnxRuntimeDecoder(dense_onnx, spec)
    torch.set_num_threads(os.cpu_count() or 1)
    eager = load_torch_model("smollm2-135m", progress=progress)
    eager.config.use_cache = True
    prompt = load_tokenizer("smollm2-135m")(PROMPT)["input_ids"]

    nbits = OnnxRuntimeDecoder(*matmul_nbits_graphs(work, dense_onnx, spec, progress))
    runs = {"transformers eager": lambda: _transformers_generate(eager, prompt, new_tokens),
            "onnxruntime dense": lambda: onnxruntime.generate(prompt, new_tokens),
            "onnxruntime int4 (its MatMulNBits)": lambda: nbits.generate(prompt, new_tokens)}
    runs.update({name: (lambda m=model: generate_compiled(m, prompt, new_tokens)) for name, model in models.items()})
    peer_runs, peer_note = decode_peer_runs(new_tokens - 1, os.cpu_count() or 1)
    if peer_note:
        progress(peer_note)
    tokens, medians = time_decoding({**runs, **peer_runs}, rounds, new_tokens, progress)
    peers = {name: medians.pop(name) for name in peer_runs}
    for name in peer_runs:
        tokens.pop(name)
    base = medians["onnxruntime dense"]
    dense_bytes = ideal["ours dense"][0]
    items = []
    for name, rate in medians.items():
        item = {"variant": name, "tokens_per_s": rate, "speedup_vs_onnxruntime": rate / base,
                "ideal_speedup": dense_bytes / ideal[name][1] if name in ideal else 1.0,
                "same_tokens_as_transformers": tokens[name] == tokens["transformers eager"]}
        if name in ideal:
            item["weight_mb_read_per_token"] = ideal[name][1] / 1e6
            item["fraction_of_ideal"] = item["speedup_vs_onnxruntime"] / item["ideal_speedup"]
            if name in GOALS:
                item["goal_speedup_vs_onnxruntime"] = GOALS[name]
        items.append(item)
    # The CPU the artifacts were compiled for, which the runtime checked is this one.
    cpu = models["ours dense"].manifest.target.get("mcpu")
    report = {"model": "smollm2-135m", "batch": 1, "activations": "float32", "weight_dtypes": {name: dtype for name, _, _, dtype in OURS}, "prompt": PROMPT, "new_tokens": new_tokens,
              "rounds": rounds, "threads": os.cpu_count(), "cpu": cpu, "max_context": MAX_CONTEXT,
              "results": items, "peers": peer_rows(peers, medians), **({"peers_note": peer_note} if peer_note else {}),
              "texts": {name: load_tokenizer("smollm2-135m").decode(t) for name, t in tokens.items()}}
    if json_path:
        path = Path(json_path)
        tmp = path.with_name(path.name + ".partial")
        tmp.write_text(json.dumps(report, indent=2) + "\n")
        tmp.replace(path)
    return report


def describe(report: dict) -> list[str]:
    lines = [f"{'variant':42} {'tokens/s':>9} {'vs ORT':>7} {'ideal':>6} {'of ideal':>9} {'goal':>6}"]
    for item in report["results"]:
        goal = f">={item['goal_speedup_vs_onnxruntime']:.1f}x" if "goal_speedup_vs_onnxruntime" in item else ""
        share = f"{item['fraction_of_ideal']:.0%}" if "fraction_of_ideal" in item else ""
        lines.append(f"{item['variant']:42} {item['tokens_per_s']:9.1f} {item['speedup_vs_onnxruntime']:6.2f}x "
                     f"{item['ideal_speedup']:5.2f}x {share:>9} {goal:>6}")
    return lines + describe_peers(report)
