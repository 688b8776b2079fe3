"""``--prune-output-projection``: the output projection pruned with the other layers, and a
tied embedding table pruned with it.

The model is tiny-llama with its embedding table tied to the output projection (its config
with ``tie_word_embeddings``, saved as a Hugging Face folder), as SmolLM2-135M's is.

Tolerance: 1e-4 absolute on logits of order 1, as in ``test_compile_models.py``: our
kernels sum in another order than onnxruntime's MLAS (the gather only copies values, so
rounding comes from the matmuls alone).
"""

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import runtime
from compiler.driver import CompileOptions, compile_model
from compiler.export import ExportOptions, export
from compiler.onnx_io import load_model
from compiler.sparsify import SparsifyOptions, output_projection, get_weight, sparsify
from conftest import onnxruntime_reference
from passes.analyze_sparsity import analyze_sparsity
from test_cli import assert_one_sentence_error, sparsecc

TOLERANCE = 1e-4
VOCAB, HIDDEN = 512, 64


@pytest.fixture(scope="module")
def tied_llama(tmp_path_factory):
    """A Hugging Face folder: tiny-llama with the embedding table tied to the output projection."""
    import torch
    import transformers

    from compiler.export import _tiny_config

    config = _tiny_config("tiny-llama")
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    folder = tmp_path_factory.mktemp("tied-llama")
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tied_export(tied_llama, tmp_path_factory):
    """``tied_export(prune, seq_len)``: the tied model exported with every layer, the output
    projection included, magnitude-pruned to ``prune`` (0: dense) -> ONNX path (cached)."""
    cache = {}
    root = tmp_path_factory.mktemp("tied-exports")

    def make(prune: float, seq_len: int):
        if (prune, seq_len) not in cache:
            path = root / f"tied-{int(prune * 100)}-{seq_len}.onnx"
            export(ExportOptions(str(tied_llama), str(path), prune, seq_len=seq_len, prune_output_projection=prune > 0),
                   progress=lambda *_: None)
            cache[prune, seq_len] = path
        return cache[prune, seq_len]

    return make


def _table(model: onnx.ModelProto) -> tuple[str, np.ndarray]:
    """The embedding table's initializer name and value."""
    gather = next(node for node in model.graph.node if node.op_type == "Gather" and node.input[1] == "input_ids")
    init = next(init for init in model.graph.initializer if init.name == gather.input[0])
    return init.name, numpy_helper.to_array(init)


def test_export_prunes_the_tied_table_once_for_both_uses(tied_export):
    model = load_model(tied_export(0.9, 16))
    name, table = _table(model)
    assert table.shape == (VOCAB, HIDDEN)
    assert np.count_nonzero(table) == table.size - round(0.9 * table.size)
    # The output projection reads the same initializer (through a Transpose).
    projection = output_projection(model)
    assert projection.weight == name and projection.transposed
    layers = analyze_sparsity(model).layers
    assert len(layers) == 15 and all(abs(layer.sparsity - 0.9) < 0.01 for layer in layers)


def test_untied_output_projection_is_pruned_and_compiles(tmp_path):
    """tiny-llama's own, untied output projection is pruned like the other layers (its
    embedding table stays dense); one token runs its csr kernel."""
    source = tmp_path / "untied.onnx"
    export(ExportOptions("tiny-llama", str(source), 0.9, seq_len=1, prune_output_projection=True), progress=lambda *_: None)
    model = load_model(source)
    _, table = _table(model)
    assert np.count_nonzero(table) == table.size
    layers = analyze_sparsity(model).layers
    assert len(layers) == 15 and all(abs(layer.sparsity - 0.9) < 0.01 for layer in layers)
    summary = compile_model(CompileOptions(str(source), str(tmp_path / "u.sccx"), explain=True))
    assert not any("reads the embedding rows" in line for line in summary["explanations"])
    ids = np.array([[7]], np.int64)
    reference = onnxruntime_reference(source, {"input_ids": ids})[0]
    np.testing.assert_allclose(runtime.load(tmp_path / "u.sccx").run({"input_ids": ids})["logits"], reference,
                               atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize("method, level", [("magnitude", 0.9), ("wanda", 0.5)])
def test_sparsify_prunes_the_tied_table(tied_export, tmp_path, method, level):
    """``sparsify --prune-output-projection`` prunes the table itself, so the lookup sees
    the zeros too; wanda zeros the same fraction of every vocabulary row (one output of the
    projection), scored by the norms of the projection's input, the final hidden states."""
    from compiler.calibration import calibration_feeds
    from compiler.progress import SILENT
    from compiler.sparsify import collect_stats, wanda_mask, wanda_scores

    dense = load_model(tied_export(0.0, 16))
    # The saved folder has no tokenizer: calibrate on token ids.
    calib = tmp_path / "calib.npz"
    np.savez(calib, input_ids=np.random.default_rng(3).integers(0, VOCAB, size=(8, 1, 16)).astype(np.int64))
    out = tmp_path / "s.onnx"
    summary = sparsify(SparsifyOptions(str(tied_export(0.0, 16)), str(out), weights=f"{method}:{level}", calib=str(calib),
                                       prune_output_projection=True))
    model = load_model(out)
    name, table = _table(model)
    assert np.count_nonzero(table) == table.size - round(level * table.size)
    assert summary["weight_sparsity"]["layers"][name] == 1 - np.count_nonzero(table) / table.size
    if method == "wanda":
        projection = output_projection(dense)
        feeds = calibration_feeds(dense, str(calib), {"input_ids": [1, 16]})
        norms = collect_stats(dense, [projection.input], feeds, SILENT)[projection.input].norms
        expected = wanda_mask(wanda_scores(get_weight(dense, projection), norms), level)
        np.testing.assert_array_equal(table.T != 0, expected)
        assert ((table == 0).sum(axis=1) == round(level * HIDDEN)).all()
    ids = np.arange(16, dtype=np.int64)[None]
    logits = onnxruntime_reference(model, {"input_ids": ids})[0]
    assert np.isfinite(logits).all()


@pytest.mark.parametrize("args, fragment", [
    (["export", "tiny-llama", "--prune-output-projection"], "give --prune-magnitude too"),
    (["sparsify", "MODEL", "--weights", "seap:0.2", "--prune-output-projection"], "prunes with --weights magnitude:L or wanda:L"),
    (["sparsify", "MODEL", "--activations", "relu", "--prune-output-projection"], "prunes with --weights magnitude:L or wanda:L"),
])
def test_bad_combinations_are_one_sentence(capsys, exported, tmp_path, args, fragment):
    args = [str(exported("tiny-llama")) if arg == "MODEL" else arg for arg in args]
    code, _, err = sparsecc(capsys, *args, "-o", str(tmp_path / "out.onnx"))
    assert_one_sentence_error(code, err, fragment)
    assert not (tmp_path / "out.onnx").exists()
