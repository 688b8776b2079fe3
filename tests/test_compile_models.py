"""Compile-and-run against onnxruntime on the original (masked) ONNX model.

Tolerance: our kernels sum in a different order than onnxruntime's MLAS, so float32
results differ by rounding only. Logits of these models are O(1); 1e-4 absolute
(about 100 ulp at that scale) allows for reordered sums over K <= 256 and nothing more.
"""

import numpy as np
import pytest
import torch

import runtime
from compiler.pipeline import sparse_onnx_dump
from conftest import onnxruntime_reference

ABSOLUTE_TOLERANCE = 1e-4


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2", "tiny-opt"])
@pytest.mark.parametrize("prune", [0.0, 0.5])
def test_tiny_models_match_onnxruntime(name, prune, exported, compiled, token_ids):
    reference = onnxruntime_reference(exported(name, prune), {"input_ids": token_ids})[0]
    ours = runtime.load(compiled(name, prune)).run({"input_ids": token_ids})["logits"]
    assert ours.shape == reference.shape
    np.testing.assert_allclose(ours, reference, atol=ABSOLUTE_TOLERANCE, rtol=0)


def test_pruned_artifact_records_its_sparsity(compiled):
    manifest = runtime.load(compiled("tiny-llama", 0.5)).manifest
    # 14 of 15 linear layers are pruned to 50 %; the output projection stays dense.
    assert 0.3 < manifest.summary["weight_sparsity"] < 0.5


def _pruned_mlp():
    import torch.nn.utils.prune as prune

    torch.manual_seed(0)
    mlp = torch.nn.Sequential(
        torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 200), torch.nn.GELU(), torch.nn.Linear(200, 10)
    ).eval()
    for layer in (mlp[0], mlp[2], mlp[4]):
        prune.l1_unstructured(layer, "weight", amount=0.7)
    return mlp


@pytest.mark.parametrize("batch", [1, 5])
def test_torch_pruned_mlp_matches_onnxruntime(tmp_path, batch):
    from compiler.driver import CompileOptions, compile_model
    from compiler.torch_export import export_torch

    mlp = _pruned_mlp()
    x = torch.randn(batch, 64)
    path = tmp_path / "mlp.onnx"
    export_torch(mlp, path, (x,), ["x"], ["y"])
    summary = compile_model(CompileOptions(str(path), str(tmp_path / "mlp.sccx")))
    assert summary["weight_sparsity"] == pytest.approx(0.7, abs=0.01)
    feeds = {"x": np.random.default_rng(1).standard_normal((batch, 64)).astype(np.float32)}
    reference = onnxruntime_reference(path, feeds)[0]
    ours = runtime.load(tmp_path / "mlp.sccx").run(feeds)["y"]
    np.testing.assert_allclose(ours, reference, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        np.testing.assert_allclose(ours, mlp(torch.from_numpy(feeds["x"])).numpy(), atol=1e-5, rtol=1e-5)


def test_dynamic_export_compiles_with_given_shapes(tmp_path, token_ids):
    from compiler.driver import CompileOptions, compile_model
    from compiler.export import ExportOptions, export

    path = tmp_path / "dyn.onnx"
    export(ExportOptions("tiny-llama", str(path), dynamic=True), progress=lambda *_: None)
    compile_model(CompileOptions(str(path), str(tmp_path / "dyn.sccx"), shapes={"input_ids": [1, 16]}))
    reference = onnxruntime_reference(path, {"input_ids": token_ids})[0]
    ours = runtime.load(tmp_path / "dyn.sccx").run({"input_ids": token_ids})["logits"]
    np.testing.assert_allclose(ours, reference, atol=ABSOLUTE_TOLERANCE, rtol=0)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-opt"])
def test_gated_sparse_model_matches_onnxruntime_on_the_same_gated_onnx(name, exported, tmp_path, token_ids):
    """The compiled gated model against onnxruntime running the gated sparse ONNX (the last
    phase in the dump folder), which uses the ai.sparsecc reference functions."""
    from compiler.driver import CompileOptions, compile_model

    dump = tmp_path / "dump"
    compile_model(CompileOptions(str(exported(name, 0.5)), str(tmp_path / "g.sccx"), dump_dir=str(dump),
                                 activation_sparsity=0.5, calib="pydoc", calib_tokens=256))
    final = sparse_onnx_dump(dump)
    assert final.name.endswith("guard_gather_indices.onnx")
    reference = onnxruntime_reference(final, {"input_ids": token_ids})[0]
    ours = runtime.load(tmp_path / "g.sccx").run({"input_ids": token_ids})["logits"]
    np.testing.assert_allclose(ours, reference, atol=ABSOLUTE_TOLERANCE, rtol=0)
    # The gates changed the function: the dense model gives other logits.
    dense = onnxruntime_reference(exported(name, 0.5), {"input_ids": token_ids})[0]
    assert np.abs(dense - reference).max() > 10 * ABSOLUTE_TOLERANCE


def _sparse_op_model(format, block, k=48, n=40, rows=1, seed=0, sparsity=0.8, weight=None):
    """A one-node model: x [rows, k] -> SparseMatMul[format] -> y, with reference functions
    (on ``weight`` when given, else on a random one with ``sparsity`` zeros)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from passes import sparse_ops
    from passes.sparse_formats import encode

    if weight is None:
        rng = np.random.default_rng(seed)
        weight = rng.standard_normal((k, n)).astype(np.float32)
        weight[rng.random((k, n)) < sparsity] = 0
        weight[:, 3] = 0  # an all-zero output row of W^T
    k, n = weight.shape
    arrays = encode(weight, format, block)
    names = [f"w{i}" for i in range(len(arrays))]
    node = sparse_ops.sparse_matmul_node("x", names, "y", format, (k, n), block)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [rows, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [rows, n])],
                              [numpy_helper.from_array(a, nm) for a, nm in zip(arrays, names)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    return sparse_ops.attach_reference_functions(model)


@pytest.mark.parametrize("format, block", [("csr", None), ("bitmask", None), ("bsr", (16, 1)), ("bsr", (4, 4)), ("bsr", (1, 8))])
@pytest.mark.parametrize("rows", [1, 3, 12])
def test_sparse_ops_compile_to_kernels_and_match_onnxruntime(tmp_path, format, block, rows):
    import onnx

    from compiler.driver import CompileOptions, compile_model

    path = tmp_path / "sparse.onnx"
    onnx.save(_sparse_op_model(format, block, rows=rows), path)
    summary = compile_model(CompileOptions(str(path), str(tmp_path / "s.sccx"), explain=True))
    kernel_lines = [line for line in summary["explanations"] if line.startswith("cpu:")]
    # Decode-sized inputs use the sparse kernel; a prompt-sized one the dense kernel.
    expected = f"{format} sparse kernel" if rows <= 8 else "dense kernel on the decoded weight"
    assert expected in kernel_lines[0], kernel_lines
    x = np.random.default_rng(1).standard_normal((rows, 48)).astype(np.float32)
    reference = onnxruntime_reference(path, {"x": x})[0]
    ours = runtime.load(tmp_path / "s.sccx").run({"x": x})["y"]
    np.testing.assert_allclose(ours, reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("prune, kernel", [(0.0, "gated kernel"), (0.9, "dual-sparse kernel")])
def test_decode_step_uses_gated_kernels_and_matches_onnxruntime(prune, kernel, exported, tmp_path):
    from compiler.driver import CompileOptions, compile_model

    source = exported("tiny-llama", prune, seq_len=1)
    dump = tmp_path / "dump"
    summary = compile_model(CompileOptions(str(source), str(tmp_path / "g.sccx"), dump_dir=str(dump), explain=True,
                                           activation_sparsity=0.5, calib="pydoc", calib_tokens=256))
    assert any(kernel in line for line in summary["explanations"]), summary["explanations"]
    ids = np.array([[42]], np.int64)
    reference = onnxruntime_reference(sparse_onnx_dump(dump), {"input_ids": ids})[0]
    ours = runtime.load(tmp_path / "g.sccx").run({"input_ids": ids})["logits"]
    np.testing.assert_allclose(ours, reference, atol=ABSOLUTE_TOLERANCE, rtol=0)


@pytest.mark.parametrize("format, block", [("csr", None), ("bitmask", None), ("bsr", (4, 1))])
def test_all_zero_sparse_weight_compiles_to_zeros(tmp_path, format, block):
    import onnx

    from compiler.driver import CompileOptions, compile_model

    path = tmp_path / "zero.onnx"
    onnx.save(_sparse_op_model(format, block, sparsity=1.0), path)
    compile_model(CompileOptions(str(path), str(tmp_path / "z.sccx")))
    x = np.random.default_rng(2).standard_normal((1, 48)).astype(np.float32)
    np.testing.assert_array_equal(runtime.load(tmp_path / "z.sccx").run({"x": x})["y"], np.zeros((1, 40), np.float32))
