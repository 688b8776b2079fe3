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
