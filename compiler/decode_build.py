"""Compiling a decoder: the decode step and its prefill step into one artifact.

``sparsecc export --decode`` writes two graphs over the same weights
(``compiler.decode_export``). They are compiled one after the other with the same
passes and the same activation gates: the gates are calibrated on the prefill graph (text
windows of ``prefill_len`` tokens at position 0) and given by tensor name to the decode
graph, whose tensors carry the same names. The artifact holds one weights file: a weight
the prefill library reads that is byte for byte one the decode library reads is stored
once (with a prefill length of at most 8 every weight is shared). The manifest's main
graph is the decode step; ``graphs["prefill"]`` describes the other library and
``decoding`` how the runtime drives both (``runtime.decoder``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import onnx

from compiler import __version__
from compiler.build import artifact_bytes, build_graph, dense_weight_bytes, gating_for, input_signature, weight_size
from compiler.decode_export import KEY_LAYOUT, cache_names, decoding_metadata
from compiler.onnx_io import load_model
from compiler.progress import Progress
from passes.guard_gather_indices import intersect_ranges
from runtime.artifact import Manifest, WeightSpec, is_plain_name, staging_dir, write_artifact
from runtime.errors import SparseccError

TOKENIZER = "tokenizer.json"
PREFILL_LIBRARY = "prefill.so"
ALIGNMENT = 64


def _gating(options, prefill: onnx.ModelProto, spec: dict, progress: Progress):
    """The prefill graph's gating, and a hook that hands its thresholds to the decode graph."""
    from compiler.pipeline import Gating

    if options.activation_sparsity is not None and options.calib and options.calib.endswith(".npz"):
        raise SparseccError("a decoder calibrates its gates on text (--calib pydoc or a text file), not on an .npz.")
    gating = gating_for(options, {}, progress)
    if gating is None or gating.thresholds is not None:
        return gating, (lambda: gating)
    found: dict = {}
    # Only the metadata (which tokenizer) is needed later; the graph itself can be freed.
    metadata = onnx.ModelProto()
    metadata.metadata_props.extend(prefill.metadata_props)

    def calibrate(model: onnx.ModelProto):
        from sparsify.calibration import decoder_feeds, gate_thresholds

        length = spec["prefill_len"]
        feeds = decoder_feeds(model, options.calib, length, options.calib_tokens, spec["vocab_size"], metadata)
        thresholds, measured = gate_thresholds(model, feeds, options.activation_sparsity, progress,
                                               f"{len(feeds)} windows of {length} tokens of {options.calib}")
        found.update(_by_weight(model, thresholds, measured))
        return thresholds, measured

    def reuse(model: onnx.ModelProto):
        """The prefill graph's gates for the decode graph, matched by the weights each
        gated tensor feeds (a few tensor names differ between the two exports)."""
        from passes.insert_activation_gates import gated_inputs

        thresholds, measured = {}, {}
        for tensor, nodes in gated_inputs(model).items():
            key = _weights_key(model, nodes)
            if key in found:
                thresholds[tensor], measured[tensor] = found[key]
        return thresholds, measured

    return Gating(calibrate=calibrate), (lambda: Gating(calibrate=reuse))


def _weights_key(model: onnx.ModelProto, nodes: list) -> tuple[str, ...]:
    """The sha256 of each weight the linear ``nodes`` read, sorted: a gated tensor's
    identity that survives the exporter's different constant names."""
    from passes.analyze_sparsity import constant_weight
    from passes.base import Graph

    graph = Graph(model.graph)
    digests = []
    for node in nodes:
        found = constant_weight(node.input[1], graph)
        digests.append(hashlib.sha256(np.ascontiguousarray(found[0]).tobytes()).hexdigest() if found else node.input[1])
    return tuple(sorted(digests))


def _by_weight(model: onnx.ModelProto, thresholds: dict, measured: dict) -> dict:
    """(weights read from the tensor) -> (threshold, measured sparsity), per gated tensor."""
    from passes.insert_activation_gates import gated_inputs

    return {_weights_key(model, nodes): (thresholds[tensor], measured.get(tensor))
            for tensor, nodes in gated_inputs(model).items() if tensor in thresholds}


def _regions(path: Path, entries: list[dict]) -> dict[str, int]:
    """sha256 of each weight's bytes -> its offset in ``path``."""
    blob = np.memmap(path, dtype=np.uint8, mode="r") if entries else None
    found = {}
    for entry in entries:
        digest = hashlib.sha256(blob[entry["offset"]:entry["offset"] + entry["nbytes"]]).hexdigest()
        found.setdefault(f"{digest}:{entry['nbytes']}", entry["offset"])
    return found


def merge_weights(main: Path, main_entries: list[dict], other: Path, other_entries: list[dict]) -> list[dict]:
    """Appends ``other``'s weights to the ``main`` weights file, except those ``main``
    already holds byte for byte; returns ``other``'s entries with offsets into ``main``."""
    known = _regions(main, main_entries)
    blob = np.memmap(other, dtype=np.uint8, mode="r") if other_entries else None
    merged = []
    with open(main, "ab") as handle:
        offset = handle.tell()
        for entry in other_entries:
            data = blob[entry["offset"]:entry["offset"] + entry["nbytes"]]
            key = f"{hashlib.sha256(data).hexdigest()}:{entry['nbytes']}"
            if key not in known:
                padding = -offset % ALIGNMENT
                handle.write(b"\0" * padding)
                offset += padding
                handle.write(data.tobytes())
                known[key] = offset
                offset += entry["nbytes"]
            merged.append({**entry, "offset": known[key]})
    return merged


def beside(model_path: Path, name, what: str) -> Path:
    """The file ``name`` that a decode export's metadata names, in the export's folder.

    Raises:
        SparseccError: when ``name`` is not a plain file name (the exporter writes only
            those): metadata must not make the compiler read files from elsewhere.
    """
    if not is_plain_name(name):
        raise SparseccError(f"{model_path} names {what} {name!r}, which is not a plain file name beside it; export it again.")
    return model_path.parent / name


def tokenizer_source(model_path: Path, spec: dict) -> Path | None:
    """The tokenizer the exporter wrote beside a decode export (``spec["tokenizer"]``),
    checked to be a regular file that parses as a tokenizer, or None when it names none.

    Raises:
        SparseccError: when the name is not a plain file name, the file is missing, not a
            regular file, or not a tokenizer (a crafted export must not get, say,
            ``/etc/passwd`` copied into an artifact).
    """
    import json
    import stat

    name = spec.get("tokenizer")
    if name is None:
        return None
    path = beside(model_path, name, "the tokenizer")
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise SparseccError(f"{model_path} names the tokenizer {name}, which is missing; export it again.") from None
    if not stat.S_ISREG(mode):
        raise SparseccError(f"{path} is not a regular file, so it is not the tokenizer {model_path} needs; export it again.")
    try:
        from tokenizers import Tokenizer
    except ImportError:  # the compiler does not need the package; a tokenizer's JSON has a model
        Tokenizer = None
    try:
        if Tokenizer is not None:
            Tokenizer.from_file(str(path))
        elif not isinstance(json.loads(path.read_text()).get("model"), dict):
            raise ValueError("no model")
    except Exception:  # tokenizers raises its own Exception type for a file it cannot parse
        raise SparseccError(f"{path} is not a tokenizer ({TOKENIZER}), so it is not copied into the artifact; "
                            "export the model again.") from None
    return path


def check_decoding(spec: dict, decode: onnx.ModelProto, prefill: onnx.ModelProto, path: str) -> None:
    """Refuses decode metadata that the two graphs do not bear out, at compile time rather
    than at the first ``generate``: its numbers must be whole and in range, the prefill
    graph must carry the same description, and the graphs' inputs and logits must have
    the shapes it gives (``compiler.decode_export``'s layout)."""
    counts = ("layers", "kv_heads", "head_dim", "vocab_size", "prefill_len", "max_context")
    for key in counts:
        value = spec.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise SparseccError(f"{path}: its decode metadata gives {key} = {json.dumps(value)}, not a positive whole "
                                "number; export it again.")
    if not spec["prefill_len"] <= spec["max_context"]:
        raise SparseccError(f"{path}: its decode metadata's prefill_len {spec['prefill_len']} exceeds its max_context "
                            f"{spec['max_context']}; export it again.")
    eos = spec.get("eos_token_ids")
    if not isinstance(eos, list) or not all(type(t) is int and 0 <= t < spec["vocab_size"] for t in eos):
        raise SparseccError(f"{path}: its decode metadata's eos_token_ids are not token ids below its vocab_size; "
                            "export it again.")
    prefill_spec = decoding_metadata(prefill, role="prefill")
    if prefill_spec is None or {**prefill_spec, "role": "decode"} != spec:
        raise SparseccError(f"{path}: its prefill step {spec['prefill_model']} does not carry the same decode metadata "
                            "(they come from different exports); export them again.")
    layers, heads, head_dim, context = spec["layers"], spec["kv_heads"], spec["head_dim"], spec["max_context"]
    for graph, tokens in ((decode, 1), (prefill, spec["prefill_len"])):
        expected = {"input_ids": [1, tokens], "position": [1]}
        for name in cache_names(layers):
            expected[name] = [1, heads, head_dim, context] if "key" in name else [1, heads, context, head_dim]
        initializers = {init.name for init in graph.graph.initializer}
        found = {value.name: [d.dim_value if d.HasField("dim_value") else None for d in value.type.tensor_type.shape.dim]
                 for value in graph.graph.input if value.name not in initializers}
        logits = next((value for value in graph.graph.output if value.name == "logits"), None)
        vocab = logits.type.tensor_type.shape.dim[-1].dim_value if logits and logits.type.tensor_type.shape.dim else None
        if found != expected or vocab != spec["vocab_size"]:
            step = "decode" if tokens == 1 else "prefill"
            raise SparseccError(f"{path}: the {step} graph's inputs or logits do not have the shapes its decode metadata "
                                f"gives ({layers} layers, cache of {context}, vocabulary {spec['vocab_size']}); export it again.")


def compile_decoder(options, model: onnx.ModelProto, target, progress: Progress) -> dict:
    """Compiles a decode graph and its prefill graph into one artifact; returns a summary."""
    if target.name == "cuda":
        raise SparseccError("decoding with a KV cache is not built for the cuda target yet; compile the decode export "
                            "for cpu, or compile an export without --decode for cuda.")
    start = time.perf_counter()
    spec = decoding_metadata(model)
    dense_bytes = dense_weight_bytes(model)
    if options.shapes:
        raise SparseccError("a decoder's shapes are fixed at export (--max-context, --prefill-len); drop --shape.")
    prefill_path = beside(Path(options.model), spec.get("prefill_model"), "the prefill step")
    tokenizer_path = tokenizer_source(Path(options.model), spec)
    if not prefill_path.exists():
        raise SparseccError(f"{options.model} is a decode step, but its prefill step {prefill_path} is missing; export it again.")
    with progress.step(f"loading {prefill_path}"):
        prefill = load_model(prefill_path)
    check_decoding(spec, model, prefill, options.model)
    prefill_gating, decode_gating = _gating(options, prefill, spec, progress)
    dump_root = Path(options.dump_dir) if options.dump_dir else None
    explanations: list[str] = []
    staging = staging_dir(options.output)
    try:
        prefill_stage = staging / "prefill"
        prefill_stage.mkdir()
        prefill_inputs = input_signature(prefill, {})
        progress("prefill graph")
        prefill_graph = build_graph(options, prefill, prefill_inputs, target, prefill_gating, prefill_stage,
                                    dump_root / "prefill" if dump_root else None, explanations, progress)
        del prefill  # a few hundred MB for SmolLM2; the decode graph is built next
        decode_inputs = input_signature(model, {})
        progress("decode graph")
        decode_graph = build_graph(options, model, decode_inputs, target, decode_gating(), staging,
                                   dump_root / "decode" if dump_root else None, explanations, progress)
        built = decode_graph["built"]
        prefill_weights = merge_weights(staging / built["weights_file"], built["weights"],
                                        prefill_stage / prefill_graph["built"]["weights_file"], prefill_graph["built"]["weights"])
        os.replace(prefill_stage / prefill_graph["built"]["library"], staging / PREFILL_LIBRARY)
        shutil.rmtree(prefill_stage)
        tokenizer = None
        if tokenizer_path is not None:
            shutil.copyfile(tokenizer_path, staging / TOKENIZER)
            tokenizer = TOKENIZER
        if spec.get("key_layout") != KEY_LAYOUT:
            raise SparseccError(f"{options.model} was exported by an older sparsecc (another cache layout); export it again.")
        decoding = {key: spec[key] for key in ("max_context", "prefill_len", "layers", "kv_heads", "head_dim",
                                               "vocab_size", "eos_token_ids", "key_layout")}
        report = decode_graph["report"]
        manifest = Manifest(
            sparsecc_version=__version__,
            target=built["target"],
            inputs=decode_inputs,
            outputs=decode_graph["outputs"],
            weights=[WeightSpec.from_dict(entry) for entry in built["weights"]],
            files={},
            library=built["library"],
            weights_file=built["weights_file"],
            summary={
                "source": os.path.abspath(options.model),
                "linear_layers": len(report.layers),
                "weight_sparsity": report.sparsity,
                "activation_sparsity_target": options.activation_sparsity,
                "weight_dtype": options.weight_dtype, "weight_dtype_for": dict(options.weight_dtype_for),
                "compile_seconds": time.perf_counter() - start,
                **weight_size((staging / built["weights_file"]).stat().st_size, dense_bytes),
            },
            # Both graphs take the same inputs. Positions address the cache's max_context
            # slots, a bound no table lookup in the graphs gives, so it is added here.
            input_ranges=intersect_ranges({"input_ids": [0, spec["vocab_size"]], "position": [0, spec["max_context"]]},
                                          prefill_graph["input_ranges"], decode_graph["input_ranges"]),
            graphs={"prefill": {
                "library": PREFILL_LIBRARY,
                "inputs": [t.to_dict() for t in prefill_inputs],
                "outputs": [t.to_dict() for t in prefill_graph["outputs"]],
                "weights": prefill_weights,
            }},
            decoding={**decoding, "tokenizer": tokenizer},
        )
        write_artifact(options.output, manifest, staging)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return {
        "artifact": str(options.output),
        "seconds": time.perf_counter() - start,
        "weight_sparsity": report.sparsity,
        "artifact_bytes": artifact_bytes(options.output),
        "explanations": explanations if options.explain else [],
    }
