"""``sparsecc generate``: stream a decoder artifact's text, then its speed."""

from __future__ import annotations

import itertools
import sys
from typing import Callable

from runtime.errors import SparseccError


def generate_text(artifact: str, prompt: str, max_new_tokens: int, temperature: float, top_k: int, seed: int,
                  echo: Callable[..., None]) -> dict:
    """Generates after ``prompt`` with the runtime, writing each piece as it comes;
    returns the statistics (tokens, seconds, tokens per second per phase)."""
    import runtime

    model = runtime.load(artifact)
    if not hasattr(model, "generate"):
        raise SparseccError(f"{artifact} is not a decoder; export with 'sparsecc export --decode' and compile that.")
    pieces = model.generate(prompt, max_new_tokens, temperature, top_k, seed)
    first = next(pieces)  # checks the prompt and settings before anything is printed
    echo(prompt, nl=False)
    for piece in itertools.chain([first], pieces):
        echo(piece.text, nl=False)
        sys.stdout.flush()
    echo("")
    stats = model.stats
    note = " (byte tokens: this model has no tokenizer)" if model.tokenizer.is_bytes else ""
    echo(f"prefill: {stats.prompt_tokens} tokens at {stats.prefill_tokens_per_s:.1f} tokens/s; "
         f"decode: {stats.new_tokens} tokens at {stats.decode_tokens_per_s:.1f} tokens/s{note}", err=True)
    return {"prompt_tokens": stats.prompt_tokens, "new_tokens": stats.new_tokens, "tokens": stats.tokens,
            "prefill_tokens_per_s": stats.prefill_tokens_per_s, "decode_tokens_per_s": stats.decode_tokens_per_s}
