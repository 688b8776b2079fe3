"""Export of a Llama-architecture model as a KV-cache step: the decode and prefill graphs.

One torch module, ``LlamaStep``, runs ``T`` new tokens at positions ``p .. p+T-1`` against
a key/value cache of fixed size ``C`` (``--max-context``) that the runtime owns:

    inputs   input_ids [1, T], position [1] (= p), past_key_i [1, kv, d, C], past_value_i [1, kv, C, d]
    outputs  logits [1, T, vocab], new_keys / new_values [layers, kv, T, d]

The key cache is stored transposed (``[d, C]`` per head) so that the scores ``q @ K^T``
read it as it lies; a ``[C, d]`` key cache costs a transpose copy per layer and step.

Attention of a new token at position ``p + i`` covers the cache slots ``< p`` (a mask on
``arange(C) < p``) and the new tokens ``<= i``: scores against the cache and against the
new keys are computed separately and joined before the softmax, so the graph never copies
the cache. The runtime writes the returned keys and values into its cache buffers at
``p .. p+T-1``. The decode graph is ``T = 1``; the prefill graph is ``T = prefill_len``
(8 by default: the largest batch the sparse kernels take, so both graphs store their
weights in the same formats and the artifact holds them once). A prompt is prefilled in
chunks of ``T``; the last one is padded at its end, and the padding's cache slots are
overwritten before anything reads them.

Both graphs come from the same module code, so their tensors carry the same names and
activation gates calibrated on one apply to the other.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

from compiler.torch_export import export_torch
from runtime.decoder import KEY_LAYOUT
from runtime.errors import SparseccError

DECODE_KEY = "sparsecc.decode"  # ONNX metadata: the decoding description (JSON)


def _require_llama(model) -> None:
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None or not all(hasattr(layer, "self_attn") and hasattr(layer.self_attn, "q_proj") for layer in layers):
        raise SparseccError(
            f"--decode supports Llama-architecture models (tiny-llama, smollm2-135m, Llama folders), not {type(model).__name__}."
        )


def llama_step(model, max_context: int):
    """The ``LlamaStep`` module over ``model``'s weights (pruning hooks included)."""
    import torch
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    _require_llama(model)
    config = model.config

    class LlamaStep(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner
            attention = inner.model.layers[0].self_attn
            self.head_dim = attention.head_dim
            self.heads = config.num_attention_heads
            self.kv_heads = config.num_key_value_heads
            self.scale = attention.scaling

        def forward(self, input_ids, position, *cache):
            tokens = input_ids.shape[1]
            heads, kv_heads, head_dim = self.heads, self.kv_heads, self.head_dim
            group = heads // kv_heads
            positions = position + torch.arange(tokens, dtype=torch.int64)
            rotary = self.inner.model.rotary_emb
            freqs = positions[:, None].float() * rotary.inv_freq[None, :]
            angles = torch.cat((freqs, freqs), dim=-1)
            cos = (angles.cos() * rotary.attention_scaling)[None]
            sin = (angles.sin() * rotary.attention_scaling)[None]
            # Cache slots before `position` are filled; the new tokens see each other causally.
            past_visible = torch.arange(max_context, dtype=torch.int64)[None, :] < position
            causal = torch.ones(tokens, tokens, dtype=torch.bool).tril()
            minimum = torch.finfo(torch.float32).min

            hidden = self.inner.model.embed_tokens(input_ids)
            new_keys, new_values = [], []
            for index, layer in enumerate(self.inner.model.layers):
                attention = layer.self_attn
                x = layer.input_layernorm(hidden)
                q = attention.q_proj(x).view(1, tokens, heads, head_dim).transpose(1, 2)
                k = attention.k_proj(x).view(1, tokens, kv_heads, head_dim).transpose(1, 2)
                v = attention.v_proj(x).view(1, tokens, kv_heads, head_dim).transpose(1, 2)
                q, k = apply_rotary_pos_emb(q, k, cos, sin)
                new_keys.append(k[0])
                new_values.append(v[0])
                past_key, past_value = cache[2 * index], cache[2 * index + 1]
                # Query heads grouped by the key/value head they share (GQA), no copies.
                q = q.reshape(1, kv_heads, group * tokens, head_dim)
                past_scores = torch.matmul(q, past_key) * self.scale
                past_scores = torch.where(past_visible, past_scores, minimum)
                new_scores = (torch.matmul(q, k.transpose(-1, -2)) * self.scale).view(1, kv_heads, group, tokens, tokens)
                new_scores = torch.where(causal, new_scores, minimum).view(1, kv_heads, group * tokens, tokens)
                weights = torch.softmax(torch.cat((past_scores, new_scores), dim=-1), dim=-1)
                out = torch.matmul(weights[..., :max_context], past_value) + torch.matmul(weights[..., max_context:], v)
                out = out.view(1, heads, tokens, head_dim).transpose(1, 2).reshape(1, tokens, heads * head_dim)
                hidden = hidden + attention.o_proj(out)
                hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
            logits = self.inner.lm_head(self.inner.model.norm(hidden))
            return logits, torch.stack(new_keys), torch.stack(new_values)

    return LlamaStep(model)


def cache_names(layers: int) -> list[str]:
    """Input names of the cache buffers, in graph order."""
    return [name for i in range(layers) for name in (f"past_key_{i}", f"past_value_{i}")]


def decoding_spec(model, max_context: int, prefill_len: int, prefill_file: str, tokenizer_file: str | None) -> dict:
    """What the runtime needs to drive the two graphs (stored in the ONNX metadata and the manifest)."""
    config = model.config
    eos = config.eos_token_id
    return {
        "max_context": max_context,
        "prefill_len": prefill_len,
        "layers": config.num_hidden_layers,
        "kv_heads": config.num_key_value_heads,
        "head_dim": model.model.layers[0].self_attn.head_dim,
        "vocab_size": config.vocab_size,
        "eos_token_ids": sorted(eos) if isinstance(eos, (list, tuple, set)) else ([] if eos is None else [int(eos)]),
        "key_layout": KEY_LAYOUT,
        "prefill_model": prefill_file,
        "tokenizer": tokenizer_file,
    }


def export_decoder(model, output: str, max_context: int, prefill_len: int, metadata: dict[str, str],
                   tokenizer_dir: Path | None, progress: Callable[[str], None]) -> dict:
    """Writes the decode graph to ``output`` and the prefill graph beside it.

    ``output`` gets the decode step (``T = 1``); ``STEM.prefill.onnx`` the prefill step
    (``T = prefill_len``); ``STEM.tokenizer.json`` the tokenizer when the model has one.
    """
    import torch

    if max_context < 2 or prefill_len < 1 or prefill_len > max_context:
        raise SparseccError(f"--max-context must be at least 2 and at least --prefill-len ({prefill_len}), not {max_context}.")
    positions = getattr(model.config, "max_position_embeddings", None)
    if positions and max_context > positions:
        raise SparseccError(f"--max-context {max_context} exceeds the model's {positions} positions.")
    step = llama_step(model, max_context)
    output = Path(output)
    stem = output.name[:-5] if output.name.endswith(".onnx") else output.name
    prefill_path = output.with_name(f"{stem}.prefill.onnx")
    tokenizer_file = None
    if tokenizer_dir is not None and (tokenizer_dir / "tokenizer.json").exists():
        tokenizer_file = f"{stem}.tokenizer.json"
        output.parent.mkdir(parents=True, exist_ok=True)
        tmp = output.with_name(tokenizer_file + ".partial")
        shutil.copyfile(tokenizer_dir / "tokenizer.json", tmp)
        tmp.replace(output.with_name(tokenizer_file))
    spec = decoding_spec(model, max_context, prefill_len, prefill_path.name, tokenizer_file)
    key_shape = (1, spec["kv_heads"], spec["head_dim"], max_context)
    value_shape = (1, spec["kv_heads"], max_context, spec["head_dim"])
    names = cache_names(spec["layers"])
    for path, tokens in ((prefill_path, prefill_len), (output, 1)):
        progress(f"exporting the {'prefill' if tokens > 1 else 'decode'} step ({tokens} token{'s' * (tokens > 1)}, "
                 f"cache of {max_context}) with the dynamo exporter")
        example = (torch.zeros((1, tokens), dtype=torch.int64), torch.zeros((1,), dtype=torch.int64),
                   *[torch.zeros(key_shape if "key" in name else value_shape) for name in names])
        role = {"role": "prefill" if tokens > 1 else "decode"}
        export_torch(step, path, example, ["input_ids", "position", *names], ["logits", "new_keys", "new_values"],
                     metadata={**metadata, DECODE_KEY: json.dumps({**spec, **role})})
    return spec


def decoding_metadata(model, role: str = "decode") -> dict | None:
    """The decoding description of a ``role`` graph written by ``export_decoder``, else None.

    Raises:
        SparseccError: when the metadata is not a JSON object (hand-edited or crafted).
    """
    for prop in model.metadata_props:
        if prop.key == DECODE_KEY:
            try:
                spec = json.loads(prop.value)
            except (ValueError, RecursionError):
                spec = None
            if not isinstance(spec, dict):
                raise SparseccError(f"the model's {DECODE_KEY} metadata is not a JSON object; export it again.")
            return spec if spec.get("role") == role else None
    return None
