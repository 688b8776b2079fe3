"""Careless and hostile input to the CLI: each ends in one ``sparsecc: error:`` sentence and
exit 1, with nothing half-written, or in a correct result (issue 15).

The cases are small: hand-made ONNX models of a few nodes, and the session's tiny exports
and artifacts from ``conftest.py``.
"""

import errno
import os
import stat

import numpy as np
import onnx
import onnx.helper as helper
import pytest

from compiler.onnx_io import load_model, save_model
from runtime.errors import SparseccError
from test_cli import assert_one_sentence_error, sparsecc


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def small_model(seed: int = 0) -> onnx.ModelProto:
    """y = x W with W a [16, 32] float initializer (2 KB, so it goes to the data file)."""
    weight = np.random.default_rng(seed).standard_normal((16, 32)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])], "small",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 16])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 32])],
        [onnx.numpy_helper.from_array(weight, "W")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)


def _weight(model: onnx.ModelProto) -> np.ndarray:
    return onnx.numpy_helper.to_array(model.graph.initializer[0])


# --- 1. saving ONNX: again into the working folder, and the graph/data pair -------------

def test_saving_twice_into_the_working_folder(tmp_path, monkeypatch):
    """onnx.save_model checked its location= name against the working folder, so the
    second save of ee.onnx there failed with FileExistsError (also with an absolute path)."""
    monkeypatch.chdir(tmp_path)
    model = small_model()
    for path in ("ee.onnx", "ee.onnx", str(tmp_path / "ee.onnx")):
        save_model(model, path)
        np.testing.assert_array_equal(_weight(load_model(path)), _weight(model))
    assert _weight(model).shape == (16, 32), "the caller's model keeps its weights"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ee.onnx", "ee.onnx.data"]


def test_sparsify_twice_into_the_working_folder(capsys, exported, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for _ in range(2):
        code, _, err = sparsecc(capsys, "sparsify", str(exported("tiny-llama")), "--weights", "magnitude:0.5", "-o", "s.onnx")
        assert code == 0, err
    assert load_model(tmp_path / "s.onnx").graph.initializer


def test_saved_files_follow_the_umask(tmp_path):
    save_model(small_model(), tmp_path / "m.onnx")
    for name in ("m.onnx", "m.onnx.data"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~_umask(), name


def test_a_graph_beside_data_it_was_not_saved_with_is_refused(tmp_path, monkeypatch):
    """A kill between the two renames of an overwrite leaves the old graph with the new
    data; the graph's recorded sha256 of its data file catches it."""
    path = tmp_path / "m.onnx"
    save_model(small_model(0), path)
    replace = os.replace

    def killed_before_the_graph(source, target):
        if str(target) == str(path):
            raise KeyboardInterrupt  # the process dies here
        replace(source, target)

    monkeypatch.setattr(os, "replace", killed_before_the_graph)
    with pytest.raises(KeyboardInterrupt):
        save_model(small_model(1), path)
    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(SparseccError, match="do not belong together"):
        load_model(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"], "no partial files left"
    save_model(small_model(1), path)
    np.testing.assert_array_equal(_weight(load_model(path)), _weight(small_model(1)))


# --- 2. -o that cannot be written, and writes the system refuses ----------------------

@pytest.fixture
def artifact_link(compiled, tmp_path):
    link = tmp_path / "link.sccx"
    link.symlink_to(compiled("tiny-llama"))
    return link


def _verb(verb: str, compiled, exported, tmp_path, output: str) -> list[str]:
    np.save(tmp_path / "ids.npy", np.zeros((1, 16), np.int64))
    return {
        "compile": ["compile", str(exported("tiny-llama")), "-o", output],
        "run": ["run", str(compiled("tiny-llama")), "--input", f"input_ids={tmp_path / 'ids.npy'}", "-o", output],
        "export": ["export", "tiny-llama", "--seq-len", "4", "-o", output],
        "profile": ["profile", str(compiled("tiny-llama")), "--json", output],
    }[verb]


@pytest.mark.parametrize("verb", ["compile", "run", "export", "profile"])
@pytest.mark.parametrize("kind, fragment", [("through a file", "notes.txt is a file, not a folder"),
                                            ("a link to an artifact", "link.sccx")])
def test_an_output_path_that_cannot_be_written(capsys, compiled, exported, tmp_path, artifact_link, verb, kind, fragment):
    (tmp_path / "notes.txt").write_text("mine")
    output = str(tmp_path / "notes.txt" / "x") if kind == "through a file" else str(artifact_link)
    code, _, err = sparsecc(capsys, *_verb(verb, compiled, exported, tmp_path, output))
    assert_one_sentence_error(code, err, fragment)
    assert code == 1
    assert (tmp_path / "notes.txt").read_text() == "mine" and artifact_link.is_symlink()
    assert (artifact_link / "manifest.json").exists(), "the linked artifact is untouched"


def test_compile_onto_an_existing_file(capsys, exported, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    code, _, err = sparsecc(capsys, "compile", str(exported("tiny-llama")), "-o", str(tmp_path / "notes.txt"))
    assert_one_sentence_error(code, err, "exists and is not a folder")
    assert (tmp_path / "notes.txt").read_text() == "mine"


class _FullDisk:
    """A file whose writes fail as on a full (or read-only) disk."""

    def __init__(self, handle, error: int):
        self.handle, self.error = handle, error

    def write(self, data):
        raise OSError(self.error, os.strerror(self.error))

    def __getattr__(self, name):
        return getattr(self.handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.close()


def _refuse_writes(monkeypatch, error: int) -> None:
    fdopen = os.fdopen
    monkeypatch.setattr(os, "fdopen", lambda *args, **kwargs: _FullDisk(fdopen(*args, **kwargs), error))


def _hidden(folder) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("error, reason", [(errno.ENOSPC, "the disk is full"), (errno.EROFS, "the file system is read-only")])
def test_a_refused_write_of_run_output_or_onnx_leaves_nothing(capsys, compiled, tmp_path, monkeypatch, error, reason):
    np.save(tmp_path / "ids.npy", np.zeros((1, 16), np.int64))
    save_model(small_model(0), tmp_path / "old.onnx")
    _refuse_writes(monkeypatch, error)
    code, _, err = sparsecc(capsys, "run", str(compiled("tiny-llama")), "--input", f"input_ids={tmp_path / 'ids.npy'}",
                            "-o", str(tmp_path / "out.npz"))
    assert_one_sentence_error(code, err, f"cannot write {tmp_path / 'out.npz'}: {reason}")
    with pytest.raises(SparseccError, match=reason):
        save_model(small_model(1), tmp_path / "old.onnx")
    monkeypatch.undo()
    assert not (tmp_path / "out.npz").exists() and not _hidden(tmp_path), "no partial files"
    np.testing.assert_array_equal(_weight(load_model(tmp_path / "old.onnx")), _weight(small_model(0)))


def test_a_full_disk_during_compile_keeps_the_old_artifact(capsys, compiled, tmp_path, monkeypatch):
    import shutil

    import runtime.artifact

    artifact = tmp_path / "keep.sccx"
    shutil.copytree(compiled("tiny-llama"), artifact)
    before = (artifact / "manifest.json").read_text()
    save_model(small_model(), tmp_path / "small.onnx")

    def full(*_):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(runtime.artifact, "write_manifest", full)
    code, _, err = sparsecc(capsys, "compile", str(tmp_path / "small.onnx"), "-o", str(artifact))
    assert_one_sentence_error(code, err, "the disk is full")
    assert (artifact / "manifest.json").read_text() == before
    assert not _hidden(tmp_path), "no staging folder left"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_folder(capsys, exported, tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    save_model(small_model(), tmp_path / "small.onnx")
    folder.chmod(0o555)
    try:
        code, _, err = sparsecc(capsys, "compile", str(tmp_path / "small.onnx"), "-o", str(folder / "x.sccx"))
        assert_one_sentence_error(code, err, "permission denied")
        code, _, err = sparsecc(capsys, "sparsify", str(exported("tiny-llama")), "--weights", "magnitude:0.5",
                                "-o", str(folder / "s.onnx"))
        assert_one_sentence_error(code, err, "permission denied")
        assert list(folder.iterdir()) == []
    finally:
        folder.chmod(0o755)


# --- 3. numeric options out of range, and --thresholds ---------------------------------

@pytest.mark.parametrize("args, fragment", [
    (["compile", "m.onnx", "-o", "x.sccx", "--calib-tokens", "0"], "'--calib-tokens': 0 is not in the range x>=1"),
    (["compile", "m.onnx", "-o", "x.sccx", "--calib-tokens", "-5"], "'--calib-tokens': -5 is not in the range"),
    (["compile", "m.onnx", "-o", "x.sccx", "--activation-sparsity", "nan"], "'--activation-sparsity': nan is not a finite"),
    (["compile", "m.onnx", "-o", "x.sccx", "-t", "neuro:seneca", "--chips", "100000000"], "'--chips': 100000000 is not in"),
    (["export", "tiny-llama", "-o", "x.onnx", "--prune-magnitude", "nan"], "'--prune-magnitude': nan is not a finite"),
    (["export", "tiny-llama", "-o", "x.onnx", "--prune-magnitude", "1"], "'--prune-magnitude': 1.0 is not in the range 0.0<=x<1.0"),
    (["export", "tiny-llama", "-o", "x.onnx", "--batch", "0"], "'--batch': 0 is not in the range x>=1"),
    (["export", "tiny-llama", "-o", "x.onnx", "--seed", "-1"], "'--seed': -1 is not in the range"),
    (["export", "tiny-llama", "-o", "x.onnx", "--decode", "--max-context", "1"], "'--max-context': 1 is not in"),
    (["sparsify", "m.onnx", "-o", "x.onnx", "--calib-tokens", "0"], "'--calib-tokens': 0 is not in"),
    (["eval", "m.onnx", "--corpus", "pydoc", "--tokens", "-1"], "'--tokens': -1 is not in"),
    (["check", "m.onnx", "--against", "m.onnx", "--atol", "nan"], "'--atol': nan is not a finite"),
    (["generate", "a.sccx", "--prompt", "hi", "--seed", "-1"], "'--seed': -1 is not in the range"),
    (["generate", "a.sccx", "--prompt", "hi", "--temperature", "inf"], "'--temperature': inf is not a finite"),
    (["generate", "a.sccx", "--prompt", "hi", "--top-k", "-2"], "'--top-k': -2 is not in"),
    (["demo", "--prune", "-0.5"], "'--prune': -0.5 is not in"),
    (["bench", "decode", "--rounds", "0"], "'--rounds': 0 is not in"),
    (["compile", "m.onnx", "--bogus"], "No such option '--bogus'"),
])
def test_an_option_out_of_range_is_one_sentence(capsys, tmp_path, monkeypatch, args, fragment):
    monkeypatch.chdir(tmp_path)
    code, _, err = sparsecc(capsys, *args)
    assert_one_sentence_error(code, err, fragment)
    assert code == 1 and list(tmp_path.iterdir()) == []


def two_layer_model() -> onnx.ModelProto:
    """y = (x W1) W2: x is a gateable linear input, h = x W1 another."""
    rng = np.random.default_rng(3)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W1"], ["h"]), helper.make_node("MatMul", ["h", "W2"], ["y"])], "two",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 16])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 8])],
        [onnx.numpy_helper.from_array(rng.standard_normal((16, 32)).astype(np.float32), "W1"),
         onnx.numpy_helper.from_array(rng.standard_normal((32, 8)).astype(np.float32), "W2")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)


@pytest.mark.parametrize("content, fragment", [
    ('{"x": NaN}', "the threshold of 'x' is NaN"),
    ('{"x": Infinity}', "the threshold of 'x' is Infinity"),
    ('{"x": true}', "the threshold of 'x' is true"),
    ('{"x": -1}', "the threshold of 'x' is -1"),
    ('{"x": 0.5, "nope": 0.1}', "--thresholds names 'nope', not the input of a linear layer"),
    ('[0.5]', "must map tensor names to numbers"),
])
def test_bad_thresholds_are_refused(capsys, tmp_path, content, fragment):
    save_model(two_layer_model(), tmp_path / "two.onnx")
    (tmp_path / "t.json").write_text(content)
    code, _, err = sparsecc(capsys, "compile", str(tmp_path / "two.onnx"), "-o", str(tmp_path / "two.sccx"),
                            "--thresholds", str(tmp_path / "t.json"))
    assert_one_sentence_error(code, err, fragment)
    assert not (tmp_path / "two.sccx").exists()


def test_given_thresholds_gate_as_written(tmp_path):
    """The positive case: a gate on x zeros |x| <= 0.5 before the first layer (fp32
    matmuls of 16 and 32 terms: 1e-5 is well above their rounding)."""
    import runtime
    from compiler.driver import CompileOptions, compile_model

    model = two_layer_model()
    save_model(model, tmp_path / "two.onnx")
    (tmp_path / "t.json").write_text('{"x": 0.5}')
    compile_model(CompileOptions(str(tmp_path / "two.onnx"), str(tmp_path / "two.sccx"), thresholds=str(tmp_path / "t.json")))
    x = np.random.default_rng(0).standard_normal((1, 16)).astype(np.float32)
    w1, w2 = (onnx.numpy_helper.to_array(init) for init in model.graph.initializer)
    expected = (np.where(np.abs(x) > 0.5, x, 0) @ w1) @ w2
    np.testing.assert_allclose(runtime.load(tmp_path / "two.sccx").run({"x": x})["y"], expected, atol=1e-5, rtol=0)
