"""``sparsecc sparsify`` and ``sparsecc eval`` on tiny-llama: sparsity reached, runnable,
deterministic, compiled with its gates, and bad arguments as one sentence."""

import numpy as np
import pytest

from sparsify.calibration import calibration_feeds
from compiler.evaluate import perplexity, window_nll
from compiler.onnx_io import load_model
from conftest import onnxruntime_reference
from sparsify.graph import get_weight, linear_layers, mlp_blocks, weight_sparsity
from sparsify.run import SparsifyOptions, sparsify
from sparsify.stats import measure_gate_sparsity
from sparsify.wanda import wanda_mask, wanda_scores
from test_cli import assert_one_sentence_error, sparsecc


def run(exported, tmp_path, name="out", **kwargs):
    out = tmp_path / f"{name}.onnx"
    summary = sparsify(SparsifyOptions(str(exported("tiny-llama")), str(out), calib="pydoc", calib_tokens=512, **kwargs))
    return load_model(out), summary


def feeds_for(model):
    return calibration_feeds(model, "pydoc", {"input_ids": [1, 16]}, 512)


def assert_runs(model):
    logits = onnxruntime_reference(model, feeds_for(model)[0])[0]
    assert logits.shape == (1, 16, 512) and np.isfinite(logits).all()


@pytest.mark.parametrize("spec, level", [("magnitude:0.5", 0.5), ("wanda:0.5", 0.5), ("wanda:0.3", 0.3)])
def test_unstructured_weights_reach_the_level(exported, tmp_path, spec, level):
    model, summary = run(exported, tmp_path, weights=spec)
    layers = linear_layers(model)
    assert len(layers) == 14  # all but the output projection
    for layer in layers:
        weight = get_weight(model, layer)
        assert abs(1 - np.count_nonzero(weight) / weight.size - level) < 0.01, layer.weight
    if spec.startswith("wanda"):  # per output column
        weight = get_weight(model, layers[0])
        assert np.allclose((weight == 0).mean(axis=0), level, atol=1 / weight.shape[0])
    assert abs(summary["weight_sparsity"]["sparsity"] - level) < 0.01
    assert_runs(model)


def test_wanda_2_4_keeps_two_of_every_four_inputs(exported, tmp_path):
    model, summary = run(exported, tmp_path, weights="wanda:2:4")
    for layer in linear_layers(model):
        weight = get_weight(model, layer)
        groups = (weight != 0).reshape(weight.shape[0] // 4, 4, weight.shape[1]).sum(axis=1)
        assert (groups == 2).all(), layer.weight
    assert summary["weight_sparsity"]["sparsity"] == 0.5
    assert_runs(model)


@pytest.mark.parametrize("method", ["seap", "functional"])
def test_structured_methods_remove_whole_neurons(exported, tmp_path, method):
    model, summary = run(exported, tmp_path, weights=f"{method}:0.2")
    blocks = mlp_blocks(model, linear_layers(model))
    assert len(blocks) == 2
    for block in blocks:
        gate, up, down = (get_weight(model, layer) for layer in (block.gate, block.up, block.down))
        dead = np.flatnonzero(~down.any(axis=1))
        assert len(dead) == round(0.2 * 176)
        assert not gate[:, dead].any() and not up[:, dead].any()
    assert summary["weight_sparsity"]["sparsity"] == pytest.approx(35 / 176)
    assert_runs(model)


def test_functional_is_deterministic_and_differs_from_seap(exported, tmp_path):
    first, _ = run(exported, tmp_path, "a", weights="functional:0.3", seed=1)
    second, _ = run(exported, tmp_path, "b", weights="functional:0.3", seed=1)
    seap, _ = run(exported, tmp_path, "c", weights="seap:0.3")
    assert first.SerializeToString() == second.SerializeToString()
    dead = [np.flatnonzero(~get_weight(m, mlp_blocks(m, linear_layers(m))[0].down).any(axis=1)) for m in (first, seap)]
    assert set(dead[0]) != set(dead[1])


def test_fast_ica_recovers_independent_sources():
    from sparsify.functional import fast_ica

    rng = np.random.default_rng(0)
    sources = np.stack([np.sign(np.sin(np.linspace(0, 40, 2000))), rng.laplace(size=2000)], axis=1)
    mixing = np.array([[1.0, 0.5, 0.2], [0.3, 1.0, 0.8]])
    estimated = fast_ica(sources @ mixing, 2, seed=0)  # [3 features, 2 components]
    # each true mixing row is parallel to one estimated column
    cosines = np.abs((mixing / np.linalg.norm(mixing, axis=1, keepdims=True)) @
                     (estimated / np.linalg.norm(estimated, axis=0, keepdims=True)))
    assert np.sort(cosines.max(axis=1)).min() > 0.99


def test_same_seed_same_model(exported, tmp_path):
    first, _ = run(exported, tmp_path, "a", weights="wanda:0.5", activations="teal:0.4", seed=3)
    second, _ = run(exported, tmp_path, "b", weights="wanda:0.5", activations="teal:0.4", seed=3)
    assert first.SerializeToString() == second.SerializeToString()


def test_teal_reaches_the_model_wide_level(exported, tmp_path):
    model, summary = run(exported, tmp_path, activations="teal:0.4")
    gates = summary["activation_sparsity"]["gates"]
    assert len(gates) == 8
    assert abs(summary["activation_sparsity"]["sparsity"] - 0.4) < 0.01  # calibrated, weighted by weights fed
    levels = [gate["level"] for gate in gates.values()]
    assert max(levels) > min(levels)  # allocated per layer, not uniform
    measured = summary["activation_sparsity"]["measured"]
    assert len(measured) == 8 and 0.3 < np.mean(list(measured.values())) < 0.5
    assert_runs(model)


def test_cats_gates_the_silu_outputs(exported, tmp_path):
    model, summary = run(exported, tmp_path, activations="cats:0.5")
    measured = summary["activation_sparsity"]["measured"]
    assert sorted(measured) == ["mul_11_gated", "mul_20_gated", "silu_1_gated", "silu_gated"]
    assert all(abs(value - 0.5) < 0.01 for value in measured.values())
    assert_runs(model)


def test_relu_replaces_silu(exported, tmp_path):
    model, summary = run(exported, tmp_path, activations="relu")
    assert [n.op_type for n in model.graph.node].count("Relu") == 2
    assert "Sigmoid" not in [n.op_type for n in model.graph.node]
    assert all(value > 0.3 for value in summary["activation_sparsity"]["measured"].values())
    assert_runs(model)


def test_wanda_scores_by_hand():
    weight = np.array([[1.0, -2.0], [3.0, 0.5], [-0.5, 4.0]])
    norms = np.array([2.0, 1.0, 0.5])  # ||X_i|| of the three input channels
    scores = wanda_scores(weight, norms)
    assert np.allclose(scores, [[2.0, 4.0], [3.0, 0.5], [0.25, 2.0]])
    # per output column, the lowest-scoring input goes (1/3 of 3 inputs)
    assert wanda_mask(scores, 1 / 3).tolist() == [[True, True], [True, False], [False, True]]
    # where magnitude and wanda differ: |1| < |2|, but input 0 is three times as active
    flip = wanda_scores(np.array([[1.0], [2.0]]), np.array([3.0, 1.0]))
    assert wanda_mask(flip, 0.5)[:, 0].tolist() == [True, False]


def test_compiled_sparsified_model_keeps_its_gates(exported, tmp_path):
    from compiler.driver import CompileOptions, compile_model
    import runtime

    model, _ = run(exported, tmp_path, weights="wanda:0.5", activations="teal:0.4")
    artifact = tmp_path / "sparse.sccx"
    summary = compile_model(CompileOptions(str(tmp_path / "out.onnx"), str(artifact), explain=True))
    fused = [line for line in summary["explanations"] if line.startswith("fuse_gated_matmul") and "GatedMatMul" in line]
    assert len(fused) == 8
    feed = feeds_for(model)[1]
    expected = onnxruntime_reference(model, feed)[0]
    actual = runtime.load(artifact).run(feed)["logits"]
    np.testing.assert_allclose(actual, expected, atol=2e-3, rtol=1e-3)


def test_eval_onnx_and_artifact_agree(exported, compiled):
    onnx_report = perplexity(str(exported("tiny-llama")), "pydoc", 512)
    artifact_report = perplexity(str(compiled("tiny-llama")), "pydoc", 512)
    assert onnx_report["tokens"] == artifact_report["tokens"] == 32 * 15
    assert abs(artifact_report["perplexity"] / onnx_report["perplexity"] - 1) < 0.005
    assert 100 < onnx_report["perplexity"] < 2000  # random weights, 512 tokens: near uniform


def test_window_nll_by_hand():
    logits = np.log(np.array([[[0.5, 0.25, 0.25], [1 / 3, 1 / 3, 1 / 3]]]))
    nll, count = window_nll(logits, np.array([[0, 1]]))
    assert count == 1 and nll == pytest.approx(np.log(4))


def test_cli_sparsify_and_eval(capsys, exported, tmp_path):
    out = tmp_path / "cli.onnx"
    code, stdout, err = sparsecc(capsys, "sparsify", str(exported("tiny-llama")), "-o", str(out),
                                 "--weights", "wanda:2:4", "--calib", "pydoc", "--calib-tokens", "256")
    assert code == 0 and "50.0% weight sparsity" in stdout and "calibration batch" in err
    code, stdout, _ = sparsecc(capsys, "eval", str(out), "--corpus", "pydoc", "--tokens", "256", "--json")
    assert code == 0 and '"perplexity"' in stdout


@pytest.mark.parametrize("args, fragment", [
    (["--weights", "sparsegpt:0.5"], "unknown method 'sparsegpt'"),
    (["--weights", "magnitude:1.5"], "the level must be in [0, 1)"),
    (["--weights", "magnitude:-0.1"], "the level must be in [0, 1)"),
    (["--weights", "wanda:4:4"], "N:M needs 0 < N < M"),
    (["--weights", "wanda:5:4"], "N:M needs 0 < N < M"),
    (["--weights", "magnitude"], "needs a level"),
    (["--activations", "teal:2"], "the level must be in [0, 1)"),
    (["--activations", "relu:0.5"], "takes no level"),
    (["--activations", "dynk:1.5"], "the level must be in [0, 1)"),
    (["--activations", "dynk:-0.1"], "the level must be in [0, 1)"),
    (["--activations", "dynk:0.5:top3"], "unknown option 'top3'"),
    (["--activations", "dynk"], "needs a level"),
    ([], "nothing to do"),
    (["--weights", "wanda:0.5"], "needs calibration data"),
    (["--weights", "wanda:0.5", "--calib", "EMPTY"], "fewer than one batch"),
    (["--weights", "wanda:0.5", "--calib", "missing.txt"], "no such file"),
])
def test_bad_arguments_are_one_sentence(capsys, exported, tmp_path, args, fragment):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    args = [str(empty) if a == "EMPTY" else str(tmp_path / a) if a == "missing.txt" else a for a in args]
    code, _, err = sparsecc(capsys, "sparsify", str(exported("tiny-llama")), "-o", str(tmp_path / "x.onnx"), *args)
    assert_one_sentence_error(code, err, fragment)
    assert not (tmp_path / "x.onnx").exists()


def test_eval_bad_corpus_is_one_sentence(capsys, exported, tmp_path):
    code, _, err = sparsecc(capsys, "eval", str(exported("tiny-llama")), "--corpus", str(tmp_path / "none.txt"))
    assert_one_sentence_error(code, err, "no such file")


def test_torch_prune_masks_are_matched_by_shape_and_order(exported, tmp_path, capsys):
    import torch

    source = load_model(exported("tiny-llama"))
    layers = linear_layers(source)
    rng = np.random.default_rng(0)
    masks = {f"layers.{i}.weight_mask": torch.tensor(rng.random(get_weight(source, layer).T.shape) > 0.3, dtype=torch.float32)
             for i, layer in enumerate(layers)}
    masks["layers.0.weight_orig"] = torch.zeros(3)  # not a mask: ignored
    path = tmp_path / "masks.pt"
    torch.save(masks, path)
    model, summary = run(exported, tmp_path, mask=str(path))
    for i, layer in enumerate(layers):
        mask = masks[f"layers.{i}.weight_mask"].numpy().T
        weight = get_weight(model, layer)
        assert not weight[mask == 0].any() and np.array_equal(weight[mask != 0], get_weight(source, layer)[mask != 0])
    assert abs(summary["weight_sparsity"]["sparsity"] - 0.3) < 0.02
    torch.save({"x.weight_mask": torch.ones(7, 5)}, path)
    code, _, err = sparsecc(capsys, "sparsify", str(exported("tiny-llama")), "-o", str(tmp_path / "x.onnx"), "--mask", str(path))
    assert_one_sentence_error(code, err, "matches no remaining linear layer")


def test_compressed_tensors_bitmask_checkpoint_prunes_like_its_masks(exported, tmp_path, capsys):
    from safetensors.numpy import save_file

    source = load_model(exported("tiny-llama"))
    layers = linear_layers(source)
    rng = np.random.default_rng(1)
    names = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    tensors, masks = {}, []
    for i, layer in enumerate(layers):
        weight = get_weight(source, layer).T  # torch layout [out, in]
        dense = weight * (rng.random(weight.shape) > 0.4)
        masks.append(dense != 0)
        block = "self_attn" if names[i % 7].endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
        prefix = f"model.layers.{i // 7}.{block}.{names[i % 7]}"
        # written the way compressed-tensors' BitmaskCompressor does
        tensors[f"{prefix}.shape"] = np.array(dense.shape, np.int64)
        tensors[f"{prefix}.compressed"] = dense[dense != 0].astype(np.float32)
        tensors[f"{prefix}.bitmask"] = np.packbits(dense != 0, axis=-1, bitorder="little")
        counts = (dense != 0).sum(axis=1)
        tensors[f"{prefix}.row_offsets"] = (np.cumsum(counts) - counts).astype(np.int64)
    path = tmp_path / "model.safetensors"
    save_file(tensors, str(path))  # stored sorted by name: layers.1 before layers.10, down before gate
    model, summary = run(exported, tmp_path, mask=str(path))
    for layer, mask in zip(layers, masks):
        weight = get_weight(model, layer)
        assert np.array_equal(weight != 0, mask.T & (get_weight(source, layer) != 0))
    assert abs(summary["weight_sparsity"]["sparsity"] - 0.4) < 0.02
    tensors = {k: v for k, v in tensors.items() if not k.endswith(".bitmask")}
    save_file(tensors, str(path))
    code, _, err = sparsecc(capsys, "sparsify", str(exported("tiny-llama")), "-o", str(tmp_path / "x.onnx"), "--mask", str(path))
    assert_one_sentence_error(code, err, "sparse-bitmask format")

