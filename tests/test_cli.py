"""The CLI verbs as a user types them, and every bad input ending in one clear sentence."""

import json

import numpy as np
import onnx
import onnx.parser
import pytest

import runtime
from compiler.cli import main
from conftest import onnxruntime_reference


def sparsecc(capsys, *args) -> tuple[int, str, str]:
    """Runs ``sparsecc ARGS`` in-process; returns (exit code, stdout, stderr)."""
    try:
        main(list(args))
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_sentence_error(code, err, fragment):
    assert code != 0
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("sparsecc: error:")]
    assert len(lines) == 1, err
    assert fragment in lines[0], lines[0]


def test_help_lists_every_verb(capsys):
    code, out, _ = sparsecc(capsys, "--help")
    assert code == 0
    for verb in ("export", "inspect", "compile", "run", "demo"):
        assert verb in out


def test_export_inspect_compile_run(capsys, tmp_path, token_ids):
    model = tmp_path / "tiny.onnx"
    code, out, _ = sparsecc(capsys, "export", "tiny-opt", "--prune-magnitude", "0.5", "--seq-len", "16", "-o", str(model))
    assert code == 0 and model.exists() and "wrote" in out

    code, out, _ = sparsecc(capsys, "inspect", str(model), "--json")
    report = json.loads(out)
    assert code == 0 and report["totals"]["layers"] == 13
    pruned = [layer for layer in report["layers"] if layer["sparsity"] > 0.4]
    assert len(pruned) == 12 and all(layer["best_bytes"] < layer["dense_bytes"] for layer in pruned)

    code, out, _ = sparsecc(capsys, "inspect", str(model))
    assert code == 0 and "13 linear layers" in out

    artifact = tmp_path / "tiny.sccx"
    code, out, _ = sparsecc(capsys, "compile", str(model), "-t", "cpu", "-o", str(artifact),
                            "--dump-dir", str(tmp_path / "dump"), "--explain")
    assert code == 0, out
    assert (artifact / "manifest.json").exists()
    assert sorted(p.name for p in (tmp_path / "dump").glob("*.onnx")) == [
        "01-fold_pruning_masks.onnx", "02-simplify_shapes.onnx", "03-drop_dead_neurons.onnx",
        "04-dense_to_sparse.onnx", "05-fuse_gated_matmul.onnx", "06-guard_gather_indices.onnx",
        "07-legalize.onnx"]
    assert (tmp_path / "dump" / "relax-imported.py").exists()
    # legalize's dump is self-contained: every weight it lifted out of the graph is there
    # as the initializer of its graph input.
    legalized = onnx.load(str(tmp_path / "dump" / "07-legalize.onnx"))
    assert "PanelMatMul" in {node.op_type for node in legalized.graph.node}
    assert [value.name for value in legalized.graph.input][0] == "input_ids"
    assert {value.name for value in legalized.graph.input[1:]} <= {init.name for init in legalized.graph.initializer}
    assert "fold_pruning_masks: folded" in out and "cpu: " in out

    np.save(tmp_path / "ids.npy", token_ids)
    code, out, _ = sparsecc(capsys, "run", str(artifact), "--input", f"input_ids={tmp_path / 'ids.npy'}", "-o", str(tmp_path / "out.npz"))
    assert code == 0
    logits = np.load(tmp_path / "out.npz")["logits"]
    np.testing.assert_allclose(logits, onnxruntime_reference(model, {"input_ids": token_ids})[0], atol=1e-4, rtol=0)

    code, out, _ = sparsecc(capsys, "inspect", str(artifact))
    assert code == 0 and "target cpu" in out


def test_missing_model_file(capsys, tmp_path):
    code, _, err = sparsecc(capsys, "compile", str(tmp_path / "nope.onnx"), "-o", str(tmp_path / "x.sccx"))
    assert_one_sentence_error(code, err, "no such file")
    assert not (tmp_path / "x.sccx").exists()


def test_file_that_is_not_onnx(capsys, tmp_path):
    bogus = tmp_path / "bogus.onnx"
    bogus.write_bytes(b"\x00\xffthis is not a protobuf" * 10)
    for verb in (["compile", str(bogus), "-o", str(tmp_path / "x.sccx")], ["inspect", str(bogus)]):
        code, _, err = sparsecc(capsys, *verb)
        assert_one_sentence_error(code, err, "is not an ONNX model")
    assert not (tmp_path / "x.sccx").exists()


def test_unsupported_ops_are_all_named(capsys, tmp_path):
    model = onnx.parser.parse_model("""
    <ir_version: 8, opset_import: ["" : 18, "com.example" : 1]>
    odd (float[1, 4] x) => (float[1, 4] y) {
        a = com.example.Frobnicate(x)
        b = com.example.Twiddle(a)
        y = Relu(b)
    }
    """)
    path = tmp_path / "odd.onnx"
    onnx.save(model, path)
    code, _, err = sparsecc(capsys, "compile", str(path), "-o", str(tmp_path / "odd.sccx"))
    assert_one_sentence_error(code, err, "cannot compile: Frobnicate, Twiddle")
    assert not (tmp_path / "odd.sccx").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".odd")], "no staging leftovers"


def test_unknown_target_lists_the_choices(capsys, exported, tmp_path):
    code, _, err = sparsecc(capsys, "compile", str(exported("tiny-llama")), "-t", "tpu", "-o", str(tmp_path / "x.sccx"))
    assert_one_sentence_error(code, err, "unknown target 'tpu'; choose one of cpu, cuda[:sm_80|sm_87|sm_90], neuro:<chip>")


def test_unbuilt_target_says_so(capsys, exported, tmp_path, monkeypatch):
    import targets

    monkeypatch.setitem(targets.TARGETS, "tpu", ("targets.tpu", False))
    code, _, err = sparsecc(capsys, "compile", str(exported("tiny-llama")), "-t", "tpu", "-o", str(tmp_path / "x.sccx"))
    assert_one_sentence_error(code, err, "not built yet")


def test_unknown_model_source(capsys, tmp_path):
    code, _, err = sparsecc(capsys, "export", "gpt-17", "-o", str(tmp_path / "x.onnx"))
    assert_one_sentence_error(code, err, "unknown model 'gpt-17'")


def test_symbolic_shape_without_size(capsys, tmp_path):
    path = tmp_path / "dyn.onnx"
    code, _, _ = sparsecc(capsys, "export", "tiny-llama", "--dynamic", "-o", str(path))
    assert code == 0
    code, _, err = sparsecc(capsys, "compile", str(path), "-o", str(tmp_path / "x.sccx"))
    assert_one_sentence_error(code, err, "--shape input_ids=")


@pytest.mark.parametrize(
    "array, name, message",
    [
        (np.zeros((1, 16), np.int64), "tokens", "unknown input 'tokens'"),
        (np.zeros((2, 16), np.int64), "input_ids", "has shape [2, 16]"),
        (np.zeros((1, 16), np.int32), "input_ids", "has dtype int32"),
    ],
)
def test_run_with_wrong_inputs(capsys, compiled, tmp_path, array, name, message):
    np.save(tmp_path / "in.npy", array)
    out = tmp_path / "out.npz"
    code, _, err = sparsecc(capsys, "run", str(compiled("tiny-llama")), "--input", f"{name}={tmp_path / 'in.npy'}", "-o", str(out))
    assert_one_sentence_error(code, err, message)
    assert not out.exists()


def test_run_with_missing_or_bad_input_file(capsys, compiled, tmp_path):
    artifact = str(compiled("tiny-llama"))
    code, _, err = sparsecc(capsys, "run", artifact, "--input", f"input_ids={tmp_path / 'none.npy'}", "-o", str(tmp_path / "o.npz"))
    assert_one_sentence_error(code, err, "no such file")
    (tmp_path / "bad.npy").write_text("not numpy")
    code, _, err = sparsecc(capsys, "run", artifact, "--input", f"input_ids={tmp_path / 'bad.npy'}", "-o", str(tmp_path / "o.npz"))
    assert_one_sentence_error(code, err, "is not a .npy array file")


def test_run_on_corrupt_artifact(capsys, compiled, tmp_path):
    import shutil

    artifact = tmp_path / "broken.sccx"
    shutil.copytree(compiled("tiny-llama"), artifact)
    weights = artifact / "weights.bin"
    weights.write_bytes(weights.read_bytes()[:-100])
    np.save(tmp_path / "ids.npy", np.zeros((1, 16), np.int64))
    code, _, err = sparsecc(capsys, "run", str(artifact), "--input", f"input_ids={tmp_path / 'ids.npy'}", "-o", str(tmp_path / "o.npz"))
    assert_one_sentence_error(code, err, "is corrupt")
    code, _, err = sparsecc(capsys, "run", str(tmp_path / "nothing.sccx"), "--input", f"input_ids={tmp_path / 'ids.npy'}", "-o", str(tmp_path / "o.npz"))
    assert_one_sentence_error(code, err, "no such artifact")


def test_compile_replaces_an_existing_artifact_only_when_done(capsys, exported, compiled, tmp_path):
    import shutil

    artifact = tmp_path / "keep.sccx"
    shutil.copytree(compiled("tiny-llama"), artifact)
    before = (artifact / "manifest.json").read_text()
    bogus = tmp_path / "bogus.onnx"
    bogus.write_bytes(b"garbage")
    code, _, err = sparsecc(capsys, "compile", str(bogus), "-o", str(artifact))
    assert code != 0
    assert (artifact / "manifest.json").read_text() == before
    runtime.load(artifact)


def test_check_compares_a_sparse_model_with_its_original(capsys, exported, tmp_path):
    dump = tmp_path / "dump"
    code, _, _ = sparsecc(capsys, "compile", str(exported("tiny-llama", 0.9)), "-o", str(tmp_path / "s.sccx"), "--dump-dir", str(dump))
    assert code == 0
    sparse = dump / "04-dense_to_sparse.onnx"
    code, out, _ = sparsecc(capsys, "check", str(sparse), "--against", str(exported("tiny-llama", 0.9)), "--atol", "1e-4", "--json")
    report = json.loads(out)
    assert code == 0 and report["ok"] and report["outputs"][0]["top1_agreement"] == 1.0
    # Against a different model the check fails with one sentence.
    code, _, err = sparsecc(capsys, "check", str(sparse), "--against", str(exported("tiny-llama", 0.0)), "--atol", "1e-4")
    assert_one_sentence_error(code, err, "more than --atol")
