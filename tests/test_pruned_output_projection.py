"""``--prune-output-projection``, and a tied embedding table pruned with the projection:
compiled, it is stored once, sparse, and read by both the projection's sparse kernel and
the embedding lookup (``SparseGather``).

The model is tiny-llama with its embedding table tied to the output projection (its config
with ``tie_word_embeddings``, saved as a Hugging Face folder), as SmolLM2-135M's is.

Tolerance: 1e-4 absolute on logits of order 1, as in ``test_compile_models.py``: our
kernels sum in another order than onnxruntime's MLAS (the gather only copies values, so
rounding comes from the matmuls alone).
"""

import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import runtime
from compiler.driver import CompileOptions, compile_model
from compiler.export import ExportOptions, export
from compiler.onnx_io import load_model
from conftest import onnxruntime_reference
from passes.analyze_sparsity import analyze_sparsity
import formats
from sparsify.graph import get_weight, output_projection
from sparsify.run import SparsifyOptions, sparsify
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


@pytest.mark.parametrize("prune, seq_len, format", [(0.9, 1, "csr"), (0.9, 16, "csr"), (0.5, 16, "bitmask")])
def test_tied_sparse_table_matches_onnxruntime(tied_export, tmp_path, prune, seq_len, format):
    """One token (every layer sparse) and a 16-token prompt (the other layers run the dense
    kernel; the tied table stays sparse): logits equal onnxruntime's on the same ONNX."""
    source = tied_export(prune, seq_len)
    summary = compile_model(CompileOptions(str(source), str(tmp_path / "t.sccx"), explain=True))
    lines = summary["explanations"]
    assert any(f"-> {format} sparse kernel at every row count" in line for line in lines), lines
    assert any(f"reads the embedding rows from the {format} arrays" in line for line in lines), lines
    ids = np.random.default_rng(seq_len).integers(0, VOCAB, size=(1, seq_len)).astype(np.int64)
    ids[0, 0] = VOCAB - 1
    reference = onnxruntime_reference(source, {"input_ids": ids})[0]
    ours = runtime.load(tmp_path / "t.sccx").run({"input_ids": ids})["logits"]
    np.testing.assert_allclose(ours, reference, atol=TOLERANCE, rtol=0)


def test_artifact_stores_the_tied_table_once_as_csr(tied_export, tmp_path):
    """The weight bytes by hand: the 14 other layers panel-packed dense (16 rows: the dense
    kernel; every N is a multiple of the panel width, so no padding) plus the table once, as
    csr with int16 column indices; and the dense figure counts the table once too."""
    source = tied_export(0.9, 16)
    compile_model(CompileOptions(str(source), str(tmp_path / "t.sccx")))
    manifest = runtime.load(tmp_path / "t.sccx").manifest
    model = load_model(source)
    name, table = _table(model)
    others = [layer for layer in analyze_sparsity(model).layers if layer.shape != (HIDDEN, VOCAB)]
    assert len(others) == 14
    table_bytes = formats.get("csr").bytes_read(HIDDEN, VOCAB, np.count_nonzero(table))
    assert table_bytes == 4 * (VOCAB + 1) + (2 + 4) * np.count_nonzero(table)
    assert manifest.summary["weight_bytes"] == sum(4 * k * n for k, n in (l.shape for l in others)) + table_bytes
    assert manifest.summary["weight_bytes"] == sum(w.nbytes for w in manifest.weights)
    assert [w.dtype for w in manifest.weights if tuple(w.shape) == (VOCAB + 1,)] == ["int32"]  # one indptr: one copy
    every_layer_dense = 4 * sum(layer.shape[0] * layer.shape[1] for layer in analyze_sparsity(model).layers)
    assert every_layer_dense <= manifest.summary["dense_weight_bytes"] < every_layer_dense + table.nbytes
    assert manifest.summary["weights_vs_dense"] == manifest.summary["weight_bytes"] / manifest.summary["dense_weight_bytes"]


@pytest.mark.slow
def test_decoder_with_a_pruned_tied_table_matches_onnxruntime(tied_llama, tmp_path):
    """``--decode``: the decode step (1 token) and the prefill step (8 tokens) both read the
    one csr table, stored once in the artifact, and each equals onnxruntime on its ONNX."""
    onnx_path = tmp_path / "step.onnx"
    export(ExportOptions(str(tied_llama), str(onnx_path), 0.9, decode=True, max_context=32, prune_output_projection=True),
           progress=lambda *_: None)
    summary = compile_model(CompileOptions(str(onnx_path), str(tmp_path / "step.sccx"), explain=True))
    gathers = [line for line in summary["explanations"] if "reads the embedding rows from the csr arrays" in line]
    assert len(gathers) == 2, summary["explanations"]  # prefill and decode
    manifest = json.loads((tmp_path / "step.sccx" / "manifest.json").read_text())
    indptrs = [(w["offset"], w["nbytes"]) for graph in (manifest, manifest["graphs"]["prefill"])
               for w in graph["weights"] if w["shape"] == [VOCAB + 1]]
    assert len(indptrs) == 2 and len(set(indptrs)) == 1

    model = runtime.load(tmp_path / "step.sccx")
    rng = np.random.default_rng(2)
    cache = {spec.name: rng.standard_normal(spec.shape).astype(np.float32) * 0.5 for spec in model.inputs[2:]}
    for graph, path, ids in ((model, onnx_path, [[VOCAB - 1]]),
                             (model.prefill, onnx_path.with_name("step.prefill.onnx"), [list(range(0, 512, 64))])):
        feeds = {**cache, "input_ids": np.array(ids, np.int64), "position": np.array([5], np.int64)}
        ours = graph.run(feeds)
        for name, expected in zip(("logits", "new_keys", "new_values"), onnxruntime_reference(path, feeds)):
            np.testing.assert_allclose(ours[name], expected, atol=TOLERANCE, rtol=0)


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
    from compiler.progress import SILENT
    from sparsify.calibration import calibration_feeds, collect_stats
    from sparsify.wanda import wanda_mask, wanda_scores

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
    (["sparsify", "MODEL", "--like", "MODEL", "--prune-output-projection"], "prunes with --weights magnitude:L or wanda:L"),
])
def test_bad_combinations_are_one_sentence(capsys, exported, tmp_path, args, fragment):
    args = [str(exported("tiny-llama")) if arg == "MODEL" else arg for arg in args]
    code, _, err = sparsecc(capsys, *args, "-o", str(tmp_path / "out.onnx"))
    assert_one_sentence_error(code, err, fragment)
    assert not (tmp_path / "out.onnx").exists()


def test_calibration_on_a_folder_without_a_tokenizer_falls_back_to_byte_ids(tied_export, tmp_path, capsys):
    """The saved folder has weights and a config but no tokenizer files: calibrating on
    text must not end in the tokenizer's traceback; the text's bytes serve as token ids,
    as for any model without a tokenizer."""
    out = tmp_path / "teal.onnx"
    code, _, err = sparsecc(capsys, "sparsify", str(tied_export(0.0, 16)), "-o", str(out), "--activations", "teal:0.5",
                            "--calib", "pydoc", "--calib-tokens", "64")
    assert code == 0, err
    assert sum(node.op_type == "ActivationGate" for node in load_model(out).graph.node) > 0
