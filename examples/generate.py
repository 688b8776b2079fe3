"""A minimal program that embeds a sparsecc decoder: load an artifact, generate text.

    python examples/generate.py ARTIFACT [PROMPT] [MAX_NEW_TOKENS]

It needs only numpy, the TVM runtime and sparsecc's ``runtime`` package (plus
``tokenizers`` when the artifact has a tokenizer): no compiler, torch or transformers.
Build the artifact with::

    sparsecc export smollm2-135m --decode -o smollm2.onnx
    sparsecc compile smollm2.onnx -o smollm2.sccx
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

import runtime  # noqa: E402


def main() -> None:
    artifact = sys.argv[1]
    prompt = sys.argv[2] if len(sys.argv) > 2 else "Once upon a time"
    max_new_tokens = int(sys.argv[3]) if len(sys.argv) > 3 else 32
    try:
        model = runtime.load(artifact)  # checks every file's sha256, the format and the CPU
        print(prompt, end="", flush=True)
        for piece in model.generate(prompt, max_new_tokens=max_new_tokens):
            print(piece.text, end="", flush=True)
    except runtime.SparseccError as error:
        sys.exit(f"error: {error}")
    stats = model.stats
    print(f"\n[{stats.prefill_tokens_per_s:.1f} tokens/s prefill, {stats.decode_tokens_per_s:.1f} tokens/s decode]")


if __name__ == "__main__":
    main()
