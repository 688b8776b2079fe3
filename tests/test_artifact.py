import json
import shutil

import numpy as np
import pytest

import runtime
from runtime.artifact import FORMAT_VERSION, MANIFEST, Manifest, TensorSpec, WeightSpec, read_manifest, write_manifest
from conftest import onnxruntime_reference
from runtime.errors import SparseccError


def test_manifest_round_trip():
    manifest = Manifest(
        sparsecc_version="0.1.0",
        target={"name": "cpu", "mcpu": "znver4"},
        inputs=[TensorSpec("input_ids", (1, 16), "int64")],
        outputs=[TensorSpec("logits", (1, 16, 512), "float32")],
        weights=[WeightSpec("w0", (4, 64, 16), "float32", 0, 16384, "layer.weight")],
        files={"model.so": "ab" * 32},
        summary={"weight_sparsity": 0.5},
    )
    again = Manifest.from_dict(json.loads(json.dumps(manifest.to_dict())))
    assert again == manifest


def test_artifact_holds_manifest_library_weights_and_hashes(compiled):
    path = compiled("tiny-llama", 0.5)
    data = json.loads((path / MANIFEST).read_text())
    assert data["format_version"] == FORMAT_VERSION
    assert data["target"]["name"] == "cpu"
    assert data["inputs"] == [{"name": "input_ids", "shape": [1, 16], "dtype": "int64"}]
    assert data["outputs"][0]["name"] == "logits"
    assert set(data["files"]) == {"model.so", "weights.bin"}
    assert all(len(digest) == 64 for digest in data["files"].values())


@pytest.fixture
def artifact_copy(compiled, tmp_path):
    path = tmp_path / "copy.sccx"
    shutil.copytree(compiled("tiny-llama", 0.0), path)
    return path


def _edit_manifest(path, **changes):
    data = json.loads((path / MANIFEST).read_text())
    data.update(changes)
    write_manifest(path, data)


def test_truncated_weights_are_refused(artifact_copy):
    weights = artifact_copy / "weights.bin"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(SparseccError, match="weights.bin does not match its sha256"):
        runtime.load(artifact_copy)


def test_altered_library_is_refused(artifact_copy):
    library = artifact_copy / "model.so"
    data = bytearray(library.read_bytes())
    data[len(data) // 2] ^= 0xFF
    library.write_bytes(bytes(data))
    with pytest.raises(SparseccError, match="model.so does not match"):
        runtime.load(artifact_copy)


def test_missing_file_is_refused(artifact_copy):
    (artifact_copy / "model.so").unlink()
    with pytest.raises(SparseccError, match="model.so is missing"):
        runtime.load(artifact_copy)


def test_newer_format_is_refused(artifact_copy):
    _edit_manifest(artifact_copy, format_version=FORMAT_VERSION + 1)
    with pytest.raises(SparseccError, match="newer than"):
        runtime.load(artifact_copy)


def test_foreign_folder_is_refused(tmp_path):
    (tmp_path / "thing").mkdir()
    (tmp_path / "thing" / MANIFEST).write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(SparseccError, match="not a sparsecc artifact"):
        runtime.load(tmp_path / "thing")


def test_corrupt_manifest_is_refused(artifact_copy):
    (artifact_copy / MANIFEST).write_text("{not json")
    with pytest.raises(SparseccError, match="corrupt"):
        read_manifest(artifact_copy)


def test_other_cpu_is_refused(artifact_copy):
    data = json.loads((artifact_copy / MANIFEST).read_text())
    data["target"]["mcpu"] = "some-other-cpu"
    write_manifest(artifact_copy, data)
    with pytest.raises(SparseccError, match="compiled for CPU 'some-other-cpu'"):
        runtime.load(artifact_copy)


def test_other_target_is_refused(artifact_copy):
    data = json.loads((artifact_copy / MANIFEST).read_text())
    data["target"]["name"] = "tpu"
    write_manifest(artifact_copy, data)
    with pytest.raises(SparseccError, match="compiled for target 'tpu'"):
        runtime.load(artifact_copy)


@pytest.mark.parametrize(
    "feeds, message",
    [
        ({"tokens": np.zeros((1, 16), np.int64)}, "unknown input 'tokens'"),
        ({"input_ids": np.zeros((1, 8), np.int64)}, r"has shape \[1, 8\] but the model was compiled for \[1, 16\]"),
        ({"input_ids": np.zeros((1, 16), np.float32)}, "has dtype float32 but the model expects int64"),
        ({}, "missing input 'input_ids'"),
    ],
)
def test_wrong_inputs_are_refused(compiled, feeds, message):
    model = runtime.load(compiled("tiny-llama", 0.0))
    with pytest.raises(SparseccError, match=message):
        model.run(feeds)


def test_cpu_lacking_an_instruction_set_is_refused(artifact_copy):
    """Where LLVM's CPU name is not available (runtime-only TVM), the instruction-set
    flags recorded at build decide."""
    data = json.loads((artifact_copy / MANIFEST).read_text())
    assert data["target"]["isa"], "the build records the host's instruction sets"
    data["target"]["isa"] = data["target"]["isa"] + ["sve2"]
    write_manifest(artifact_copy, data)
    with pytest.raises(SparseccError, match="has instructions this machine lacks \\(sve2\\)"):
        runtime.load(artifact_copy)


def test_decoder_with_an_altered_prefill_library_is_refused(decoder, tmp_path):
    import shutil

    copy = tmp_path / "decoder.sccx"
    shutil.copytree(decoder[1], copy)
    with open(copy / "prefill.so", "r+b") as handle:
        handle.seek(100)
        handle.write(b"\x00\x01")
    with pytest.raises(SparseccError, match="prefill.so does not match its sha256"):
        runtime.load(copy)


def test_token_ids_past_the_embedding_table_are_refused(compiled):
    model = runtime.load(compiled("tiny-llama", 0.0))
    with pytest.raises(SparseccError, match=r"'input_ids' holds 512, outside the valid range \[0, 511\]"):
        model.run({"input_ids": np.full((1, 16), 512, np.int64)})


def test_artifact_rebuilt_at_the_same_path_runs_its_own_library(exported, tmp_path, token_ids):
    """A process that loaded an artifact and then loads another one compiled to the same
    path gets the new library (the dynamic loader alone would hand back the first)."""
    from compiler.driver import CompileOptions, compile_model

    path = tmp_path / "same.sccx"
    outputs = {}
    for source in ("tiny-llama", "tiny-gpt2"):
        compile_model(CompileOptions(str(exported(source)), str(path)))
        model = runtime.load(path)
        ids = token_ids % 256  # within both models' vocabularies
        outputs[source] = model.run({"input_ids": ids})["logits"]
        reference = onnxruntime_reference(exported(source), {"input_ids": ids})[0]
        np.testing.assert_allclose(outputs[source], reference, atol=1e-4, rtol=0)
