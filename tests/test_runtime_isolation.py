import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def test_runtime_runs_without_importing_compiler_or_passes(compiled, tmp_path, token_ids):
    artifact = compiled("tiny-llama", 0.5)
    np.save(tmp_path / "ids.npy", token_ids)
    script = textwrap.dedent(
        f"""
        import sys
        import numpy as np
        import runtime
        model = runtime.load({str(artifact)!r})
        out = model.run({{"input_ids": np.load({str(tmp_path / 'ids.npy')!r})}})
        assert isinstance(out, dict) and out["logits"].shape == (1, 16, 512), out
        banned = [m for m in sys.modules if m.split(".")[0] in ("compiler", "passes", "targets")]
        print("BANNED", banned)
        np.save({str(tmp_path / 'out.npy')!r}, out["logits"])
        """
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "BANNED []" in result.stdout, result.stdout
    import runtime

    in_process = runtime.load(artifact).run({"input_ids": token_ids})["logits"]
    np.testing.assert_array_equal(np.load(tmp_path / "out.npy"), in_process)
