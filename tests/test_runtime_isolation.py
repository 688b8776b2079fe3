"""The runtime loads and runs artifacts, and generates text, with only the TVM runtime and
numpy: never the compiler, the passes, the targets, the sparsification methods, the
benchmarks, the format descriptions, ``tvm.relax``, torch or transformers.

Each check runs in a fresh process (the test process itself has all of them loaded). Any
attempt there to import one of them but torch raises at once; torch, which ``tvm_ffi``
tries to import whenever it is installed, must end up not loaded
(``runtime/tvm_runtime.py`` refuses it for TVM's import).
"""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent

GUARD = textwrap.dedent(
    """
    import importlib.abc, sys
    FORBIDDEN = ("compiler", "passes", "targets", "sparsify", "benchmarks", "formats", "tvm.relax", "transformers")
    class Forbid(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if any(name == f or name.startswith(f + ".") for f in FORBIDDEN):
                raise RuntimeError(f"the runtime imported {name}")
            return None
    sys.meta_path.insert(0, Forbid())
    """
)
REPORT = textwrap.dedent(
    """
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("compiler", "passes", "targets", "sparsify", "benchmarks",
                                                                  "formats", "torch", "transformers")
                    or m.startswith("tvm.relax"))
    print("LOADED", loaded)
    """
)


def run_isolated(body: str) -> str:
    result = subprocess.run([sys.executable, "-c", GUARD + textwrap.dedent(body) + REPORT], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "LOADED []" in result.stdout, result.stdout
    return result.stdout


def test_runtime_runs_an_artifact_with_the_tvm_runtime_and_numpy_only(compiled, tmp_path, token_ids):
    artifact = compiled("tiny-llama", 0.5)
    np.save(tmp_path / "ids.npy", token_ids)
    run_isolated(f"""
        import numpy as np
        import runtime
        model = runtime.load({str(artifact)!r})
        out = model.run({{"input_ids": np.load({str(tmp_path / 'ids.npy')!r})}})
        assert isinstance(out, dict) and out["logits"].shape == (1, 16, 512), out
        np.save({str(tmp_path / 'out.npy')!r}, out["logits"])
    """)
    import runtime

    in_process = runtime.load(artifact).run({"input_ids": token_ids})["logits"]
    np.testing.assert_array_equal(np.load(tmp_path / "out.npy"), in_process)


def test_runtime_generates_with_the_tvm_runtime_and_numpy_only(decoder):
    artifact = decoder[1]
    out = run_isolated(f"""
        import json
        import runtime
        model = runtime.load({str(artifact)!r})
        print("TOKENS", json.dumps(list(model.generate_ids([5, 6, 7, 8, 9], 6, stop_at_eos=False))))
    """)
    import runtime

    tokens = json.loads(out.split("TOKENS", 1)[1].splitlines()[0])
    assert tokens == list(runtime.load(artifact).generate_ids([5, 6, 7, 8, 9], 6, stop_at_eos=False))


def test_the_example_program_generates(decoder):
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "generate.py"), str(decoder[1]), "Hello", "8"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Hello") and "tokens/s" in result.stdout
