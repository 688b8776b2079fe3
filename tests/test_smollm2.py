"""SmolLM2-135M end to end: export pruned, compile for cpu, compare with onnxruntime.

Tolerance: logits of this model reach magnitude ~40; our matmuls sum 576- and
1536-long dot products in a different order than onnxruntime's MLAS, so errors of a few
1e-4 absolute are rounding. 2e-3 absolute (5e-5 relative to the largest logit) is far
below anything that changes a prediction, and the top-1 tokens must agree exactly.
"""

import numpy as np
import pytest

import runtime
from compiler.pipeline import sparse_onnx_dump
from conftest import onnxruntime_reference


@pytest.mark.model
@pytest.mark.slow
def test_smollm2_pruned_compiles_and_matches_onnxruntime(tmp_path):
    from runtime.corpus import pydoc_text
    from compiler.driver import CompileOptions, compile_model, inspect
    from compiler.export import ExportOptions, export, load_tokenizer

    onnx_path = tmp_path / "smollm2.onnx"
    export(ExportOptions("smollm2-135m", str(onnx_path), prune_magnitude=0.5, seq_len=32), progress=lambda *_: None)
    report = inspect(str(onnx_path))
    pruned = [layer for layer in report["layers"] if layer["shape"] != [576, 49152]]
    assert len(pruned) == 210
    assert all(abs(layer["sparsity"] - 0.5) < 0.01 for layer in pruned)

    artifact = tmp_path / "smollm2.sccx"
    compile_model(CompileOptions(str(onnx_path), str(artifact)))
    ids = load_tokenizer("smollm2-135m")(pydoc_text()[:4000], return_tensors="np")["input_ids"][:, :32].astype(np.int64)
    ours = runtime.load(artifact).run({"input_ids": ids})["logits"]
    reference = onnxruntime_reference(onnx_path, {"input_ids": ids})[0]
    assert ours.shape == (1, 32, 49152)
    np.testing.assert_allclose(ours, reference, atol=2e-3, rtol=0)
    assert (ours.argmax(-1) == reference.argmax(-1)).all()


@pytest.mark.model
@pytest.mark.slow
def test_smollm2_sparse_and_gated_decode_step_matches_onnxruntime(tmp_path):
    """50 % magnitude weights + 40 % activation gates, one token: the dual-sparse kernels
    against onnxruntime running the same gated sparse ONNX (same tolerance as above)."""
    from compiler.driver import CompileOptions, compile_model
    from compiler.export import ExportOptions, export

    onnx_path = tmp_path / "step.onnx"
    export(ExportOptions("smollm2-135m", str(onnx_path), prune_magnitude=0.5, seq_len=1), progress=lambda *_: None)
    dump = tmp_path / "dump"
    summary = compile_model(CompileOptions(str(onnx_path), str(tmp_path / "step.sccx"), dump_dir=str(dump), explain=True,
                                           activation_sparsity=0.4, calib="pydoc", calib_tokens=128))
    dual = [line for line in summary["explanations"] if "dual-sparse kernel" in line]
    assert len(dual) == 120  # 30 layers x (q/k/v, o, gate/up, down)
    ids = np.array([[504]], np.int64)
    reference = onnxruntime_reference(sparse_onnx_dump(dump), {"input_ids": ids})[0]
    ours = runtime.load(tmp_path / "step.sccx").run({"input_ids": ids})["logits"]
    np.testing.assert_allclose(ours, reference, atol=2e-3, rtol=0)
    assert ours.argmax() == reference.argmax()


@pytest.mark.model
def test_smollm2_requantizes_to_its_ggufs_own_weights_exactly():
    """The model transformers reads from the shipped Q4_1 GGUF holds its Q4_1 layers and
    its Q8_0 token table in float32; ``formats.quant`` quantizes them back with no error
    in any weight (int4 along each layer's inputs, int8 for the tied table), so
    ``--weight-dtype int4 --weight-dtype-for lm_head.weight=int8`` computes with the
    GGUF's own weights."""
    import torch

    from compiler.export import load_torch_model
    from formats import quant

    model = load_torch_model("smollm2-135m", progress=lambda *_: None)
    checked = 0
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear):
                weight = np.ascontiguousarray(module.weight.numpy().T)  # [K, N]: y = x @ W
                dtype = "int8" if name == "lm_head" else "int4"
                assert np.array_equal(quant.quantize(weight, dtype).dequantize(), weight), name
                checked += 1
    assert checked == 30 * 7 + 1
