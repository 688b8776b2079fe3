"""Careless and hostile input to the CLI: each ends in one ``sparsecc: error:`` sentence and
exit 1, with nothing half-written, or in a correct result (issue 15).

The cases are small: hand-made ONNX models of a few nodes, and the session's tiny exports
and artifacts from ``conftest.py``.
"""

import errno
import re
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


# --- 4. ONNX the checker refuses, and sizes that do not fit ----------------------------

def _graph_model(nodes, inputs, outputs, initializers, opset: int = 18) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)


def _float(name, shape):
    return helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, shape)


def _matmul_model(**changes) -> onnx.ModelProto:
    model = small_model()
    for key, value in changes.items():
        if key == "weight_dims":
            del model.graph.initializer[0].dims[:]
            model.graph.initializer[0].dims.extend(value)
        elif key == "input_dims":
            model.graph.input[0].CopyFrom(_float("x", value))
            model.graph.output[0].CopyFrom(_float("y", [value[0], 32]))
        elif key == "weight_dtype":
            model.graph.initializer[0].data_type = value
        elif key == "opset":
            model.opset_import[0].version = value
    return model


def _invalid_models():
    weight = onnx.numpy_helper.from_array(np.ones((16, 32), np.float32), "W")
    empty = onnx.TensorProto(name="W", data_type=onnx.TensorProto.FLOAT, dims=[16, 0])
    return {
        "a name written twice": (_graph_model(
            [helper.make_node("MatMul", ["x", "W"], ["y"]), helper.make_node("Relu", ["x"], ["y"])],
            [_float("x", [1, 16])], [_float("y", [1, 32])], [weight]), "single static assignment"),
        "a type mismatch": (_matmul_model(weight_dtype=onnx.TensorProto.INT64), "is not a valid ONNX model"),
        "an invalid dtype": (_matmul_model(weight_dtype=99), "is not a valid ONNX model"),
        "dims that disagree with the data": (_matmul_model(weight_dims=[2**31, 2**31]), "is not a valid ONNX model"),
        "a zero dimension": (_graph_model([helper.make_node("MatMul", ["x", "W"], ["y"])], [_float("x", [1, 16])],
                                          [_float("y", [1, 0])], [empty]), "has shape [16, 0], with no elements"),
        "an output without element type": (_graph_model([helper.make_node("MatMul", ["x", "W"], ["y"])],
                                                       [_float("x", [1, 16])],
                                                       [helper.make_tensor_value_info("y", onnx.TensorProto.UNDEFINED, [1, 32])],
                                                       [weight]), "its input or output 'y' has no element type"),
        "opset 99": (_matmul_model(opset=99), "uses ONNX opset 99; the newest this onnx knows is"),
        "a huge input": (_matmul_model(input_dims=[2**40, 16]), "tensor 'x' of shape [1099511627776, 16] would take 64.0 TiB"),
        "an Expand to 2^45": (_graph_model(
            [helper.make_node("Expand", ["x", "s"], ["y"])], [_float("x", [1])], [_float("y", ["n"])],
            [onnx.numpy_helper.from_array(np.array([2**45], np.int64), "s")]), "tensor 'y' of shape [35184372088832]"),
    }


@pytest.mark.parametrize("case", list(_invalid_models()))
def test_an_invalid_or_oversized_onnx_model_is_refused(capsys, tmp_path, case):
    model, fragment = _invalid_models()[case]
    path = tmp_path / "bad.onnx"
    onnx.save(model, path)
    for verb in (["inspect", str(path)], ["compile", str(path), "-o", str(tmp_path / "bad.sccx")],
                 ["check", str(path), "--against", str(path)]):
        code, _, err = sparsecc(capsys, *verb)
        assert_one_sentence_error(code, err, fragment)
    assert not (tmp_path / "bad.sccx").exists()


def test_external_data_of_the_wrong_size_is_refused(tmp_path):
    """An external tensor's bytes are read by its recorded length; dims that disagree
    (here [16, 16] for 16 x 32 floats, read by an Identity, which infers no conflict) used
    to fail later in numpy's reshape."""
    weight = onnx.numpy_helper.from_array(np.ones((16, 32), np.float32), "W")
    model = _graph_model([helper.make_node("Identity", ["W"], ["y"])], [], [_float("y", [16, 16])], [weight])
    save_model(model, tmp_path / "m.onnx")
    graph = onnx.load(tmp_path / "m.onnx", load_external_data=False)
    graph.graph.initializer[0].dims[1] = 16
    (tmp_path / "m.onnx").write_bytes(graph.SerializeToString())
    with pytest.raises(SparseccError, match=r"initializer 'W' of shape \[16, 16\] holds 2048 bytes, not 1024"):
        load_model(tmp_path / "m.onnx")


def test_sizes_given_on_the_command_line_are_checked(capsys, tmp_path, monkeypatch):
    code, _, err = sparsecc(capsys, "export", "tiny-llama", "-o", str(tmp_path / "x.onnx"), "--batch", "100000000")
    assert_one_sentence_error(code, err, "--batch 100000000 --seq-len 32: the exported graph's logits would take")
    model = _matmul_model(input_dims=["n", 16])
    onnx.save(model, tmp_path / "dyn.onnx")
    code, _, err = sparsecc(capsys, "compile", str(tmp_path / "dyn.onnx"), "-o", str(tmp_path / "x.sccx"),
                            "--shape", f"x={2**40},16")
    assert_one_sentence_error(code, err, "has a dimension above 2147483647")
    code, _, err = sparsecc(capsys, "compile", str(tmp_path / "dyn.onnx"), "-o", str(tmp_path / "x.sccx"),
                            "--shape", f"x={2**31 - 1},{2**31 - 1}")
    assert_one_sentence_error(code, err, "does not fit the model's shape")
    import runtime.memory

    monkeypatch.setattr(runtime.memory, "machine_memory_bytes", lambda: 1 << 20)  # a machine of 1 MiB
    code, _, err = sparsecc(capsys, "compile", str(tmp_path / "dyn.onnx"), "-o", str(tmp_path / "x.sccx"),
                            "--shape", "x=100000,16")
    assert_one_sentence_error(code, err, "input 'x' of shape [100000, 16] would take 6.1 MiB, more than this machine's 1.0 MiB")
    assert list(tmp_path.iterdir()) == [tmp_path / "dyn.onnx"]


# --- 5. calibration data, decode metadata, eval's recorded source ---------------------

def _calibrate(capsys, tmp_path, npz):
    save_model(two_layer_model(), tmp_path / "two.onnx")
    return sparsecc(capsys, "compile", str(tmp_path / "two.onnx"), "-o", str(tmp_path / "two.sccx"),
                    "--activation-sparsity", "0.5", "--calib", str(npz))


def test_calibration_npz_with_object_arrays_is_refused(capsys, tmp_path):
    np.savez(tmp_path / "calib.npz", x=np.array([{"a": 1}, None], dtype=object))
    code, _, err = _calibrate(capsys, tmp_path, tmp_path / "calib.npz")
    assert_one_sentence_error(code, err, "array 'x' cannot be read (Object arrays cannot be loaded")
    assert not (tmp_path / "two.sccx").exists()


def test_calibration_data_onnxruntime_cannot_run_is_one_sentence(capsys, tmp_path):
    np.savez(tmp_path / "calib.npz", x=np.zeros((3, 1, 16), np.int64))  # the model takes float
    code, _, err = _calibrate(capsys, tmp_path, tmp_path / "calib.npz")
    assert_one_sentence_error(code, err, "onnxruntime cannot run the model on the calibration data")


def test_a_model_onnxruntime_cannot_load_for_calibration_is_one_sentence():
    from passes.insert_activation_gates import probe_session

    model = two_layer_model()
    model.ir_version = 99
    with pytest.raises(SparseccError, match="onnxruntime cannot load the model to calibrate it"):
        probe_session(model, ["h"])


@pytest.fixture
def decode_copy(decoder, tmp_path):
    """A copy of the session's decode export; ``edit(key=value)`` rewrites the decode
    graph's metadata, ``edit(raw=text)`` writes it as given."""
    import json

    from compiler.decode_export import DECODE_KEY

    onnx_path, _ = decoder
    for graph in (onnx_path, onnx_path.with_name("tiny.prefill.onnx")):
        save_model(load_model(graph), tmp_path / graph.name)
    decode = load_model(tmp_path / "tiny.onnx")

    def edit(raw=None, **changes):
        prop = next(prop for prop in decode.metadata_props if prop.key == DECODE_KEY)
        prop.value = raw if raw is not None else json.dumps({**json.loads(prop.value), **changes})
        save_model(decode, tmp_path / "tiny.onnx")
        return tmp_path / "tiny.onnx"

    return edit


@pytest.mark.parametrize("edit, fragment", [
    ({"raw": "{not json"}, "sparsecc.decode metadata is not a JSON object"),
    ({"raw": "[1, 2]"}, "sparsecc.decode metadata is not a JSON object"),
    ({"layers": "two"}, 'gives layers = "two", not a positive whole number'),
    ({"layers": 3}, "does not carry the same decode metadata"),
    ({"max_context": 1_000_000}, "does not carry the same decode metadata"),
    ({"prefill_len": 100}, "prefill_len 100 exceeds its max_context 64"),
    ({"prefill_model": "tiny.onnx"}, "does not carry the same decode metadata"),
    ({"eos_token_ids": [10**9]}, "eos_token_ids are not token ids below its vocab_size"),
])
def test_inconsistent_decode_metadata_is_refused_at_compile_time(capsys, decode_copy, tmp_path, edit, fragment):
    path = decode_copy(**edit)
    code, _, err = sparsecc(capsys, "compile", str(path), "-o", str(tmp_path / "tiny.sccx"))
    assert_one_sentence_error(code, err, fragment)
    assert not (tmp_path / "tiny.sccx").exists()


def test_metadata_and_graphs_that_disagree_are_refused(decode_copy, tmp_path):
    """Both graphs' metadata edited alike, so only the graphs' shapes contradict it."""
    import json

    from compiler.decode_build import check_decoding
    from compiler.decode_export import DECODE_KEY, decoding_metadata

    decode, prefill = load_model(decode_copy()), load_model(tmp_path / "tiny.prefill.onnx")
    spec = {**decoding_metadata(decode), "layers": 3}
    for graph, role in ((decode, "decode"), (prefill, "prefill")):
        next(p for p in graph.metadata_props if p.key == DECODE_KEY).value = json.dumps({**spec, "role": role})
    with pytest.raises(SparseccError, match="the decode graph's inputs or logits do not have the shapes"):
        check_decoding({**spec, "role": "decode"}, decode, prefill, "tiny.onnx")


def test_eval_on_an_artifact_whose_source_is_not_onnx(capsys, compiled, tmp_path):
    import json
    import shutil

    from runtime.artifact import CONTENT_SHA256, MANIFEST, write_manifest

    artifact = tmp_path / "a.sccx"
    shutil.copytree(compiled("tiny-llama"), artifact)
    (tmp_path / "source.onnx").write_bytes(b"\x00\xffnot a protobuf" * 10)
    data = json.loads((artifact / MANIFEST).read_text())
    data["summary"]["source"] = str(tmp_path / "source.onnx")
    write_manifest(artifact, {key: value for key, value in data.items() if key != CONTENT_SHA256})
    code, _, err = sparsecc(capsys, "eval", str(artifact), "--corpus", "pydoc")
    assert_one_sentence_error(code, err, "which is no longer an ONNX model")


# --- 6. the manifest's schema, checked before anything is loaded ----------------------

def _nested(depth: int) -> dict:
    value: dict = {}
    for _ in range(depth):
        value = {"a": value}
    return value


def _set(path: str, value):
    """An edit of the manifest at a dotted path (``weights.0.offset``)."""
    def edit(data):
        *parents, last = path.split(".")
        for part in parents:
            data = data[int(part)] if isinstance(data, list) else data[part]
        if isinstance(data, list):
            data[int(last)] = value
        else:
            data[last] = value
    return edit


def _drop(path: str):
    def edit(data):
        *parents, last = path.split(".")
        for part in parents:
            data = data[part]
        del data[last]
    return edit


def _neuro_without_chip(data):
    data["target"]["name"] = "neuro"


MANIFEST_CASES = {
    "files as a list": (_set("files", ["weights.bin"]), "files must be an object of file name: sha256"),
    "isa as a number": (_set("target.isa", 7), "target.isa must be a list of instruction-set names, not 7"),
    "an unknown weight dtype": (_set("weights.0.dtype", "float99"), "weights[0].dtype must be one of"),
    "an offset as text": (_set("weights.0.offset", "12"), "weights[0].offset must be a whole number >= 0, not '12'"),
    "a negative offset": (_set("weights.0.offset", -64), "weights[0].offset must be a whole number >= 0"),
    "a negative shape": (_set("weights.0.shape", [-1, 4]), "weights[0].shape must be a list of whole numbers >= 0"),
    "nbytes that disagree": (_set("weights.0.nbytes", 3), "weights[0].nbytes must be"),
    "a weight past the file's end": (_set("weights.0.offset", 1 << 40), "lies past the end of weights.bin"),
    "a huge input": (_set("inputs.0.shape", [2**40, 2**20]), "would take"),
    "no inputs": (_drop("inputs"), "inputs is missing (it must be a list)"),
    "a bad input range": (_set("input_ranges", {"input_ids": [5, 2]}), "input_ranges.input_ids must be [low, high]"),
    "deep nesting": (_set("summary", _nested(200)), "nests deeper than 20 levels"),
    "a neuro artifact without its chip": (_neuro_without_chip, "target.chip is missing (it must be the chip model"),
    "decoding of the wrong type": (_set("decoding", {"layers": "two"}), "decoding.prefill_len is missing"),
    "a library as a number": (_set("library", 5), "library must be text, not 5"),
}


@pytest.mark.parametrize("case", list(MANIFEST_CASES))
def test_a_manifest_with_a_wrong_field_is_refused_in_one_sentence(capsys, compiled, tmp_path, case):
    import json
    import shutil

    import runtime
    from runtime.artifact import CONTENT_SHA256, MANIFEST, write_manifest

    edit, fragment = MANIFEST_CASES[case]
    artifact = tmp_path / "a.sccx"
    shutil.copytree(compiled("tiny-llama"), artifact)
    data = json.loads((artifact / MANIFEST).read_text())
    del data[CONTENT_SHA256]
    edit(data)
    write_manifest(artifact, data)  # with its content's sha256 redone, as a crafted one would be
    with pytest.raises(SparseccError, match=re.escape(fragment)):
        runtime.load(artifact)
    np.save(tmp_path / "ids.npy", np.zeros((1, 16), np.int64))
    code, _, err = sparsecc(capsys, "run", str(artifact), "--input", f"input_ids={tmp_path / 'ids.npy'}",
                            "-o", str(tmp_path / "o.npz"))
    assert_one_sentence_error(code, err, fragment)


@pytest.mark.parametrize("replacement", ["a folder", "a link to /dev/zero"])
def test_a_weights_file_that_is_not_a_regular_file_is_refused(compiled, tmp_path, replacement):
    import shutil

    import runtime

    artifact = tmp_path / "a.sccx"
    shutil.copytree(compiled("tiny-llama"), artifact)
    (artifact / "weights.bin").unlink()
    if replacement == "a folder":
        (artifact / "weights.bin").mkdir()
    else:
        (artifact / "weights.bin").symlink_to("/dev/zero")
    with pytest.raises(SparseccError, match="not a regular file|symbolic link leading out"):
        runtime.load(artifact)


def test_inputs_the_library_was_not_compiled_for_are_refused(compiled, tmp_path):
    """An input shape edited in the manifest (its hash redone): TVM's own parameter check
    refuses it before any kernel runs, and that is one sentence."""
    import json
    import shutil

    import runtime
    from runtime.artifact import CONTENT_SHA256, MANIFEST, write_manifest

    artifact = tmp_path / "a.sccx"
    shutil.copytree(compiled("tiny-llama"), artifact)
    data = json.loads((artifact / MANIFEST).read_text())
    del data[CONTENT_SHA256]
    data["inputs"][0]["shape"] = [1, 8]
    write_manifest(artifact, data)
    with pytest.raises(SparseccError, match="not the ones its library was compiled for"):
        runtime.load(artifact).run({"input_ids": np.zeros((1, 8), np.int64)})


def test_the_runtime_still_imports_nothing_of_the_compiler():
    import subprocess
    import sys

    code = ("import sys, runtime, runtime.manifest_schema, runtime.memory; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'compiler', 'passes', 'targets'}))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
