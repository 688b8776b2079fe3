"""Text generation with a compiled decoder: prefill, then one decode step per token.

The artifact holds two graphs over one set of weights (``compiler.decode_build``): the
prefill step (``prefill_len`` tokens per call) and the decode step (one token). Both take
the key/value cache of every layer, ``[1, kv_heads, max_context, head_dim]``, and return
only the new tokens' keys and values; this module owns the cache and writes them in at
their positions. The cache arrays are numpy arrays shared with TVM through DLPack, so
writing a row in numpy is all it takes; nothing copies the cache per step.

    model = runtime.load("smollm2.sccx")
    for piece in model.generate("The capital of France is", max_new_tokens=20):
        print(piece.text, end="", flush=True)
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from runtime.artifact import Manifest, TensorSpec, WeightSpec
from runtime.errors import SparseccError
from runtime.executor import CompiledModel, check_range
from runtime.tvm_runtime import tvm as _tvm

# The key cache's layout per layer after the batch axis, as the exporter makes it
# (compiler/decode_export.py) and this runtime writes it.
KEY_LAYOUT = "kv_heads,head_dim,context"
# numpy arrays handed to TVM keep TVM's alignment so its kernels may assume it.
ALIGNMENT = 64


@dataclass
class Piece:
    """One generated token: its id and the text it adds (may be empty mid-character)."""

    token: int
    text: str


@dataclass
class GenerationStats:
    """Tokens and seconds of the last ``generate`` call, split by phase."""

    prompt_tokens: int = 0
    prefill_seconds: float = 0.0
    new_tokens: int = 0
    decode_seconds: float = 0.0
    tokens: list[int] = field(default_factory=list)

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        # The first new token comes from the prefill's logits; each later one costs a step.
        steps = max(self.new_tokens - 1, 0)
        return steps / self.decode_seconds if self.decode_seconds else 0.0


def _aligned_zeros(shape: tuple[int, ...]) -> np.ndarray:
    count = int(np.prod(shape))
    raw = np.zeros(count + ALIGNMENT // 4, np.float32)
    start = (-raw.ctypes.data % ALIGNMENT) // 4
    return raw[start:start + count].reshape(shape)


class Tokenizer:
    """The artifact's ``tokenizer.json`` through the ``tokenizers`` package, or bytes as
    token ids for random-weight test models that have none."""

    def __init__(self, path, vocab_size: int):
        self.vocab_size = vocab_size
        self._tokenizer = None
        if path is not None:
            from tokenizers import Tokenizer as HFTokenizer

            self._tokenizer = HFTokenizer.from_file(str(path))

    @property
    def is_bytes(self) -> bool:
        return self._tokenizer is None

    def encode(self, text: str) -> list[int]:
        if self._tokenizer is not None:
            return list(self._tokenizer.encode(text, add_special_tokens=False).ids)
        return [b % self.vocab_size for b in text.encode("utf-8")]

    def decode(self, ids: list[int]) -> str:
        if self._tokenizer is not None:
            return self._tokenizer.decode(ids, skip_special_tokens=False)
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class DecoderModel(CompiledModel):
    """A compiled decoder: ``run`` is the decode step; ``generate`` produces text.

    Generation keeps its cache in the model object, so one loaded model generates for one
    caller at a time: ``generate`` holds ``generation_lock`` for its whole run, and a
    second thread waits for the first to finish.
    """

    def __init__(self, path, manifest: Manifest):
        import threading

        super().__init__(path, manifest)
        decoding = manifest.decoding
        if decoding.get("key_layout") != KEY_LAYOUT:
            raise SparseccError(f"{path} is a decoder built by an older sparsecc (another cache layout); compile it again.")
        self.max_context = int(decoding["max_context"])
        self.prefill_len = int(decoding["prefill_len"])
        self.layers = int(decoding["layers"])
        self.vocab_size = int(decoding["vocab_size"])
        self.eos_token_ids = [int(t) for t in decoding.get("eos_token_ids", [])]
        prefill = manifest.graphs["prefill"]
        prefill_manifest = Manifest(**{
            **manifest.__dict__,
            "library": prefill["library"],
            "inputs": [TensorSpec.from_dict(t) for t in prefill["inputs"]],
            "outputs": [TensorSpec.from_dict(t) for t in prefill["outputs"]],
            "weights": [WeightSpec.from_dict(w) for w in prefill["weights"]],
            "graphs": {}, "decoding": {},
        })
        self.prefill = CompiledModel(path, prefill_manifest, weight_cache=self._weight_cache)
        tokenizer = decoding.get("tokenizer")
        self.tokenizer = Tokenizer(self.path / tokenizer if tokenizer else None, self.vocab_size)
        # Keys are cached transposed, [1, kv_heads, head_dim, context] (compiler/decode_export.py).
        value_shape = (1, int(decoding["kv_heads"]), self.max_context, int(decoding["head_dim"]))
        key_shape = (1, int(decoding["kv_heads"]), int(decoding["head_dim"]), self.max_context)
        self._cache = [_aligned_zeros(shape) for _ in range(self.layers) for shape in (key_shape, value_shape)]
        tvm = _tvm()
        self._cache_tensors = [tvm.runtime.from_dlpack(array) for array in self._cache]
        self.generation_lock = threading.Lock()
        self.stats = GenerationStats()

    def _step(self, graph: CompiledModel, ids: np.ndarray, position: int) -> np.ndarray:
        """Runs one graph on ``ids`` at ``position``; writes the new keys and values into
        the cache; returns the logits [tokens, vocab]."""
        tvm = _tvm()
        args = [tvm.runtime.tensor(ids, self.device), tvm.runtime.tensor(np.array([position], np.int64), self.device)]
        logits, keys, values = graph.call(args + self._cache_tensors)
        keys, values = keys.numpy(), values.numpy()
        count = ids.shape[1]
        write_cache(self._cache[0::2], self._cache[1::2], keys, values, position, count)
        return logits.numpy()[0]

    def _prefill(self, prompt: list[int]) -> np.ndarray:
        """Fills the cache with the prompt in chunks; returns the last token's logits."""
        length = self.prefill_len
        for start in range(0, len(prompt), length):
            chunk = prompt[start:start + length]
            ids = np.zeros((1, length), np.int64)
            ids[0, :len(chunk)] = chunk
            # A short last chunk is padded; its padding writes cache slots past the prompt,
            # which every later step overwrites before attending to them.
            logits = self._step(self.prefill, ids, start)
            last = logits[len(chunk) - 1]
        return last

    def generate_ids(self, prompt: list[int], max_new_tokens: int = 32, temperature: float = 0.0, top_k: int = 0,
                     seed: int = 0, stop_at_eos: bool = True) -> Iterator[int]:
        """Yields new token ids, one at a time, after ``prompt`` (a list of ids).

        ``temperature`` 0 is greedy; otherwise tokens are sampled from the softmax of
        ``logits / temperature``, restricted to the ``top_k`` most likely when it is > 0.
        ``self.stats`` holds the prefill and decode timings afterwards.

        Raises:
            SparseccError: for an empty prompt, ids outside the vocabulary, bad sampling
                settings, or a prompt plus new tokens longer than the cache.
        """
        prompt = [int(t) for t in prompt]
        if not prompt:
            raise SparseccError("the prompt is empty; give at least one token.")
        # The steps are called unchecked: the prompt is held to the range the graphs' tables allow.
        check_range("prompt", np.asarray(prompt, np.int64), self.manifest.input_ranges.get("input_ids", (0, self.vocab_size)))
        if max_new_tokens < 1:
            raise SparseccError(f"--max-new-tokens must be at least 1, not {max_new_tokens}.")
        if temperature < 0 or not np.isfinite(temperature):
            raise SparseccError(f"--temperature must be 0 (greedy) or positive, not {temperature}.")
        if top_k < 0:
            raise SparseccError(f"--top-k must be 0 (all tokens) or positive, not {top_k}.")
        if seed < 0:
            raise SparseccError(f"--seed must be 0 or positive, not {seed}.")
        # The padded last prefill chunk must fit in the cache too.
        padded = -(-len(prompt) // self.prefill_len) * self.prefill_len
        if len(prompt) + max_new_tokens > self.max_context or padded > self.max_context:
            raise SparseccError(
                f"the prompt ({len(prompt)} tokens) plus {max_new_tokens} new tokens exceed this artifact's context of "
                f"{self.max_context}; export with a larger --max-context or ask for fewer tokens."
            )
        rng = np.random.default_rng(seed)
        with self.generation_lock:
            self.stats = stats = GenerationStats(prompt_tokens=len(prompt))
            start = time.perf_counter()
            logits = self._prefill(prompt)
            stats.prefill_seconds = time.perf_counter() - start
            position = len(prompt)
            for index in range(max_new_tokens):
                token = _choose(logits, temperature, top_k, rng)
                stats.new_tokens += 1
                stats.tokens.append(token)
                yield token
                if (stop_at_eos and token in self.eos_token_ids) or index == max_new_tokens - 1:
                    break
                # Only the steps are timed, not the caller's work between tokens.
                start = time.perf_counter()
                logits = self._step(self, np.array([[token]], np.int64), position)[0]
                stats.decode_seconds += time.perf_counter() - start
                position += 1

    def generate(self, prompt: str, max_new_tokens: int = 32, temperature: float = 0.0, top_k: int = 0,
                 seed: int = 0) -> Iterator[Piece]:
        """Yields the text after ``prompt`` piece by piece (see ``generate_ids``)."""
        ids = self.tokenizer.encode(prompt)
        produced: list[int] = []
        shown = ""
        for token in self.generate_ids(ids, max_new_tokens, temperature, top_k, seed):
            produced.append(token)
            text = self.tokenizer.decode(produced)
            # Hold back a piece that ends inside a multi-byte character.
            if text.endswith("\ufffd"):
                yield Piece(token, "")
                continue
            yield Piece(token, text[len(shown):])
            shown = text


def write_cache(key_cache: list[np.ndarray], value_cache: list[np.ndarray], keys: np.ndarray, values: np.ndarray,
                position: int, count: int) -> None:
    """Writes the first ``count`` new tokens' keys and values ``[layers, kv, T, d]`` at
    ``position``: keys into ``[1, kv, d, C]`` caches, values into ``[1, kv, C, d]``."""
    for layer, (key, value) in enumerate(zip(key_cache, value_cache)):
        key[0, :, :, position:position + count] = keys[layer, :, :count].transpose(0, 2, 1)
        value[0, :, position:position + count] = values[layer, :, :count]


def _choose(logits: np.ndarray, temperature: float, top_k: int, rng: np.random.Generator) -> int:
    if temperature == 0:
        return int(np.argmax(logits))
    scaled = logits.astype(np.float64) / temperature
    if top_k and top_k < scaled.size:
        cutoff = np.partition(scaled, -top_k)[-top_k]
        scaled = np.where(scaled >= cutoff, scaled, -np.inf)
    probabilities = np.exp(scaled - scaled.max())
    probabilities /= probabilities.sum()
    return int(rng.choice(scaled.size, p=probabilities))
