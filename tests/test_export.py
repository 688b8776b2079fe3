import numpy as np
import pytest
import torch

from compiler.export import ExportOptions, export, load_torch_model
from compiler.onnx_io import load_model
from conftest import onnxruntime_reference
from runtime.errors import SparseccError


def test_hugging_face_folder_exports_and_matches_pytorch(tmp_path, token_ids):
    model = load_torch_model("tiny-llama", seed=3)
    folder = tmp_path / "hf-model"
    model.save_pretrained(folder)
    path = tmp_path / "folder.onnx"
    export(ExportOptions(str(folder), str(path), seq_len=16), progress=lambda *_: None)
    exported = load_model(path)
    assert [i.name for i in exported.graph.input] == ["input_ids"]
    assert {p.key: p.value for p in exported.metadata_props}["sparsecc.source"] == str(folder.resolve())
    with torch.no_grad():
        expected = model(torch.from_numpy(token_ids)).logits.numpy()
    np.testing.assert_allclose(onnxruntime_reference(path, {"input_ids": token_ids})[0], expected, atol=1e-4, rtol=0)


def test_large_weights_go_to_external_data(exported):
    path = exported("tiny-gpt2")
    data = path.with_name(path.name + ".data")
    assert data.exists() and data.stat().st_size > path.stat().st_size


def test_seeded_tiny_models_are_deterministic():
    first = load_torch_model("tiny-opt", seed=5).state_dict()
    second = load_torch_model("tiny-opt", seed=5).state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_folder_without_config_is_refused(tmp_path):
    with pytest.raises(SparseccError, match="not a Hugging Face model"):
        export(ExportOptions(str(tmp_path), str(tmp_path / "x.onnx")), progress=lambda *_: None)


def test_prune_level_out_of_range_is_refused(tmp_path):
    with pytest.raises(SparseccError, match="--prune-magnitude must be in"):
        export(ExportOptions("tiny-llama", str(tmp_path / "x.onnx"), prune_magnitude=1.5), progress=lambda *_: None)
