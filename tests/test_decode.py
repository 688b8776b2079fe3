"""Decoding with a KV cache: export --decode, one artifact with both graphs, generation.

Tolerances: tiny-llama's logits are of order 1; our kernels sum in another order than
onnxruntime's, so differences are a few 1e-6. 1e-4 absolute is far below anything that
changes a prediction; greedy tokens must equal transformers' exactly.
"""

import json
import threading

import numpy as np
import pytest

import runtime
from compiler.cli import main
from compiler.pipeline import sparse_onnx_dump
from conftest import onnxruntime_reference
from runtime.errors import SparseccError

PROMPT = np.random.default_rng(0).integers(0, 512, 11).tolist()


def transformers_greedy(source: str, prompt: list[int], new_tokens: int) -> list[int]:
    import torch

    from compiler.export import load_torch_model

    model = load_torch_model(source)
    model.config.use_cache = True
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def test_export_writes_decode_and_prefill_graphs(decoder):
    onnx_path, _ = decoder
    assert onnx_path.with_name("tiny.prefill.onnx").exists()
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    names = [value.name for value in model.graph.input][:4]
    assert names == ["input_ids", "position", "past_key_0", "past_value_0"]
    assert [value.name for value in model.graph.output] == ["logits", "new_keys", "new_values"]


def test_one_artifact_holds_both_graphs_and_each_weight_once(decoder):
    _, artifact = decoder
    manifest = json.loads((artifact / "manifest.json").read_text())
    assert manifest["decoding"]["max_context"] == 64 and manifest["decoding"]["prefill_len"] == 8
    prefill = manifest["graphs"]["prefill"]
    assert (artifact / prefill["library"]).exists()
    decode_regions = {(w["offset"], w["nbytes"]) for w in manifest["weights"]}
    assert {(w["offset"], w["nbytes"]) for w in prefill["weights"]} <= decode_regions
    assert (artifact / "weights.bin").stat().st_size <= max(o + n for o, n in decode_regions)


def test_decode_step_matches_onnxruntime(decoder):
    """The compiled decode step, with a filled cache, against onnxruntime on the same ONNX."""
    onnx_path, artifact = decoder
    model = runtime.load(artifact)
    rng = np.random.default_rng(1)
    feeds = {spec.name: (rng.standard_normal(spec.shape).astype(np.float32) if spec.dtype == "float32" else None)
             for spec in model.inputs}
    feeds["input_ids"] = np.array([[7]], np.int64)
    feeds["position"] = np.array([20], np.int64)
    ours = model.run(feeds)
    reference = onnxruntime_reference(onnx_path, feeds)
    for name, expected in zip(("logits", "new_keys", "new_values"), reference):
        np.testing.assert_allclose(ours[name], expected, atol=1e-4, rtol=0)


def test_greedy_generation_equals_transformers(decoder):
    _, artifact = decoder
    model = runtime.load(artifact)
    ours = list(model.generate_ids(PROMPT, max_new_tokens=24, stop_at_eos=False))
    assert ours == transformers_greedy("tiny-llama", PROMPT, 24)
    assert model.stats.prompt_tokens == 11 and model.stats.new_tokens == 24
    assert model.stats.prefill_tokens_per_s > 0 and model.stats.decode_tokens_per_s > 0


def test_sampling_is_seeded_and_top_k_restricts(decoder):
    _, artifact = decoder
    model = runtime.load(artifact)
    first = list(model.generate_ids(PROMPT, 16, temperature=1.0, top_k=5, seed=3, stop_at_eos=False))
    again = list(model.generate_ids(PROMPT, 16, temperature=1.0, top_k=5, seed=3, stop_at_eos=False))
    assert first == again
    assert list(model.generate_ids(PROMPT, 16, temperature=1.0, top_k=1, seed=9, stop_at_eos=False)) == \
        list(model.generate_ids(PROMPT, 16, stop_at_eos=False))


@pytest.mark.parametrize("kwargs, message", [
    ({"prompt": [600]}, r"holds 600, outside the valid range \[0, 511\]"),
    ({"prompt": []}, "the prompt is empty"),
    ({"max_new_tokens": 60}, "exceed this artifact's context of 64"),
    ({"temperature": -1.0}, "--temperature must be 0"),
    ({"top_k": -2}, "--top-k must be 0"),
])
def test_bad_generation_settings_are_refused(decoder, kwargs, message):
    model = runtime.load(decoder[1])
    settings = {"prompt": PROMPT, "max_new_tokens": 4, **kwargs}
    with pytest.raises(SparseccError, match=message):
        list(model.generate_ids(**settings))


def test_step_inputs_are_checked_before_any_kernel(decoder):
    model = runtime.load(decoder[1])
    feeds = {spec.name: np.zeros(spec.shape, spec.dtype) for spec in model.inputs}
    with pytest.raises(SparseccError, match=r"'position' holds 64, outside the valid range \[0, 63\]"):
        model.run({**feeds, "position": np.array([64], np.int64)})
    with pytest.raises(SparseccError, match="'input_ids' holds -1"):
        model.run({**feeds, "input_ids": np.array([[-1]], np.int64)})
    with pytest.raises(SparseccError, match="NaN or infinite"):
        model.run({**feeds, "past_key_0": np.full(feeds["past_key_0"].shape, np.nan, np.float32)})


def test_two_threads_on_one_model_get_correct_results(decoder):
    """Steps and generations from two threads on one loaded model are serialised by its
    locks and each thread gets what it would get alone."""
    model = runtime.load(decoder[1])
    expected = list(model.generate_ids(PROMPT, 12, stop_at_eos=False))
    rng = np.random.default_rng(2)
    step_feeds = {spec.name: np.zeros(spec.shape, spec.dtype) for spec in model.inputs}
    step_feeds["past_key_0"] = rng.standard_normal(step_feeds["past_key_0"].shape).astype(np.float32)
    step_feeds["position"] = np.array([5], np.int64)
    step_expected = model.run(step_feeds)["logits"]
    results, errors = [], []

    def work():
        try:
            for _ in range(3):
                results.append(list(model.generate_ids(PROMPT, 12, stop_at_eos=False)))
                np.testing.assert_array_equal(model.run(step_feeds)["logits"], step_expected)
        except Exception as exc:  # reported below; a thread's exception is otherwise lost
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    assert results == [expected] * 6


def test_cli_generate_streams_text_and_reports_speed(decoder, capsys):
    try:
        main(["generate", str(decoder[1]), "--prompt", "Hello", "--max-new-tokens", "5"])
    except SystemExit as exc:
        assert exc.code in (0, None)
    captured = capsys.readouterr()
    assert captured.out.startswith("Hello")
    assert "prefill: 5 tokens at" in captured.err and "decode: 5 tokens at" in captured.err


def test_cli_generate_refuses_a_plain_artifact(compiled, capsys):
    with pytest.raises(SystemExit):
        main(["generate", str(compiled("tiny-llama", 0.0)), "--prompt", "Hi"])
    err = capsys.readouterr().err
    assert "sparsecc: error:" in err and "is not a decoder" in err and "Traceback" not in err


def test_export_decode_refuses_other_architectures(tmp_path):
    from compiler.export import ExportOptions, export

    with pytest.raises(SparseccError, match="--decode supports Llama-architecture models"):
        export(ExportOptions("tiny-gpt2", str(tmp_path / "g.onnx"), decode=True), progress=lambda *_: None)


@pytest.mark.slow
def test_pruned_and_gated_decoder_matches_onnxruntime(tmp_path):
    """50 % magnitude pruning and 50 % activation gates calibrated on the prefill graph:
    both graphs share the gates and the weights, and the decode step equals onnxruntime
    on the gated sparse ONNX the pipeline produced."""
    from compiler.driver import CompileOptions, compile_model
    from compiler.export import ExportOptions, export

    onnx_path = tmp_path / "sparse.onnx"
    export(ExportOptions("tiny-llama", str(onnx_path), prune_magnitude=0.5, decode=True, max_context=32),
           progress=lambda *_: None)
    summary = compile_model(CompileOptions(str(onnx_path), str(tmp_path / "sparse.sccx"), dump_dir=str(tmp_path / "dump"),
                                           explain=True, activation_sparsity=0.5, calib="pydoc", calib_tokens=256))
    assert any("gated" in line or "dual-sparse" in line for line in summary["explanations"])
    manifest = json.loads((tmp_path / "sparse.sccx" / "manifest.json").read_text())
    assert {w["offset"] for w in manifest["graphs"]["prefill"]["weights"]} <= {w["offset"] for w in manifest["weights"]}
    model = runtime.load(tmp_path / "sparse.sccx")
    rng = np.random.default_rng(4)
    feeds = {spec.name: rng.standard_normal(spec.shape).astype(np.float32) * 0.5 for spec in model.inputs[2:]}
    feeds.update(input_ids=np.array([[42]], np.int64), position=np.array([9], np.int64))
    reference = onnxruntime_reference(sparse_onnx_dump(tmp_path / "dump" / "decode"), feeds)
    ours = model.run(feeds)
    for name, expected in zip(("logits", "new_keys", "new_values"), reference):
        np.testing.assert_allclose(ours[name], expected, atol=1e-4, rtol=0)
    assert len(list(model.generate_ids(PROMPT[:9], 8))) >= 1


@pytest.mark.model
@pytest.mark.slow
def test_smollm2_greedy_generation_equals_transformers(tmp_path):
    """SmolLM2-135M dense, exported with --decode and compiled: 24 greedy tokens after a
    real prompt equal transformers' greedy generate, and the stored tokenizer round-trips."""
    from compiler.driver import CompileOptions, compile_model
    from compiler.export import ExportOptions, export, load_tokenizer

    onnx_path = tmp_path / "smollm2.onnx"
    export(ExportOptions("smollm2-135m", str(onnx_path), decode=True, max_context=64), progress=lambda *_: None)
    compile_model(CompileOptions(str(onnx_path), str(tmp_path / "smollm2.sccx")))
    model = runtime.load(tmp_path / "smollm2.sccx")
    prompt = "The capital of France is"
    ids = load_tokenizer("smollm2-135m")(prompt)["input_ids"]
    assert model.tokenizer.encode(prompt) == ids
    ours = list(model.generate_ids(ids, max_new_tokens=24, stop_at_eos=False))
    assert ours == transformers_greedy("smollm2-135m", ids, 24)
    text = "".join(piece.text for piece in model.generate(prompt, max_new_tokens=8))
    assert text == model.tokenizer.decode(ours[:8])


def test_block_pruned_decoder_keeps_sparse_kernels_after_dead_neurons_are_dropped(tmp_path):
    """90 % 16x1-block pruning leaves whole neurons dead; drop_dead_neurons removes them and
    the shape information of the tensors it narrows, and the decode step's matmuls (behind
    gates, gate/up fused and split) must still be recognised as one-row (sparse kernels),
    not fall back to the dense kernel."""
    from benchmarks.bench_decode import prune_blocks
    from compiler.decode_export import export_decoder
    from compiler.driver import CompileOptions, compile_model
    from compiler.export import load_torch_model

    model = load_torch_model("tiny-llama")
    assert prune_blocks(model, 0.9) == 14
    export_decoder(model, str(tmp_path / "b.onnx"), 16, 8, {"sparsecc.source": "tiny-llama"}, None, lambda *_: None)
    summary = compile_model(CompileOptions(str(tmp_path / "b.onnx"), str(tmp_path / "b.sccx"), explain=True,
                                           dump_dir=str(tmp_path / "dump"), activation_sparsity=0.3, calib="pydoc",
                                           calib_tokens=128))
    assert any("drop_dead_neurons" in line and "drops" in line for line in summary["explanations"])
    assert not [line for line in summary["explanations"] if "unknown rows" in line]
    # Blocks of 16 outputs that read one input are windows of 16 columns of W's rows:
    # the segment format is the smaller one, so the kernel that walks it is chosen.
    assert any("windows of 16 columns" in line for line in summary["explanations"])
    feeds = {spec.name: np.zeros(spec.shape, spec.dtype) for spec in runtime.load(tmp_path / "b.sccx").inputs}
    feeds["input_ids"] = np.array([[3]], np.int64)
    ours = runtime.load(tmp_path / "b.sccx").run(feeds)["logits"]
    reference = onnxruntime_reference(sparse_onnx_dump(tmp_path / "dump" / "decode"), feeds)[0]
    np.testing.assert_allclose(ours, reference, atol=1e-4, rtol=0)


def test_inspect_reports_weights_against_dense(decoder, capsys):
    try:
        main(["inspect", str(decoder[1])])
    except SystemExit as exc:
        assert exc.code in (0, None)
    out = capsys.readouterr().out
    summary = json.loads((decoder[1] / "manifest.json").read_text())["summary"]
    # Dense tiny-llama: every weight stored once, fp32 (norm weights stay in the library).
    assert 0.9 < summary["weights_vs_dense"] <= 1.0
    assert f"weights_vs_dense: {summary['weights_vs_dense']:.3f}" in out


def test_a_decoder_of_another_cache_layout_is_refused(decoder, tmp_path):
    import shutil

    from runtime.artifact import write_manifest

    copy = tmp_path / "old.sccx"
    shutil.copytree(decoder[1], copy)
    data = json.loads((copy / "manifest.json").read_text())
    del data["decoding"]["key_layout"]
    write_manifest(copy, data)
    with pytest.raises(SparseccError, match="built by an older sparsecc \\(another cache layout\\)"):
        runtime.load(copy)


def test_profile_of_a_decoder_runs_a_step_after_a_real_prompt(decoder):
    from compiler.profile import ProfileOptions, profile_artifact
    from compiler.progress import SILENT

    report, _ = profile_artifact(ProfileOptions(str(decoder[1]), hardware=("laptop-x86",)), SILENT)
    assert report["inputs"]["input_ids"] == [1, 1] and report["calls"] > 0
    assert any(entry["operator"].startswith("dense_matmul") for entry in report["operators"])
