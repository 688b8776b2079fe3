"""The neuromorphic target: chip models, mapping, event-driven execution and its profile.

Correctness tolerance: the event kernel sums each output over the active inputs in event
order, onnxruntime in its own blocked order; on these small fp32 models (|logits| < 5) the
rounding differences stay below 1e-5, so 1e-4 absolute is a safe bound that still catches
any missing or extra event (a dropped input changes an output by ~1e-2 or more).
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import runtime
from compiler.driver import CompileOptions, compile_model
from compiler.pipeline import sparse_onnx_dump
from conftest import onnxruntime_reference
from runtime.errors import SparseccError
from targets.neuro.chip import load_chip
from targets.neuro.cost import estimate

ATOL = 1e-4


def mlp(path, weights: list[np.ndarray], relu_between: bool = True):
    """An ONNX model x [1, K] -> MatMul -> (Relu) -> MatMul ... with constant weights."""
    nodes, initializers, current = [], [], "x"
    for index, weight in enumerate(weights):
        initializers.append(numpy_helper.from_array(weight.astype(np.float32), f"w{index}"))
        output = "y" if index == len(weights) - 1 else f"h{index}"
        nodes.append(helper.make_node("MatMul", [current, f"w{index}"], [output]))
        current = output
        if relu_between and index < len(weights) - 1:
            nodes.append(helper.make_node("Relu", [current], [f"r{index}"]))
            current = f"r{index}"
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, weights[0].shape[0]])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, weights[-1].shape[1]])], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    onnx.save(model, path)
    return path


def compile_neuro(onnx_path, artifact, chip="seneca", chips=1, **options):
    compile_model(CompileOptions(str(onnx_path), str(artifact), f"neuro:{chip}", chips=chips, **options))
    return runtime.load(artifact)


def small_chip(tmp_path, memory_bytes: int, columns: int = 4, rows: int = 2):
    """A copy of the SENECA model with a smaller mesh and core memory."""
    from targets.hardware import HERE

    text = (HERE / "seneca.toml").read_text()
    text = text.replace('memory_bytes = { value = 262144,', f'memory_bytes = {{ value = {memory_bytes},')
    text = text.replace('columns = { value = 8,', f'columns = {{ value = {columns},').replace('rows = { value = 8,', f'rows = {{ value = {rows},')
    path = tmp_path / "small.toml"
    path.write_text(text)
    return str(path)


# --- chip models ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["seneca", "loihi2"])
def test_builtin_chip_models_load_with_every_number_sourced(name):
    chip = load_chip(name)
    assert chip["cores_per_chip"] == chip["columns"] * chip["rows"]
    numbers = [key for key, value in chip.items() if isinstance(value, (int, float)) and key not in ("chips", "cores_per_chip")]
    assert len(numbers) == 29 and set(numbers) == set(chip["sources"])
    assert all(chip["sources"][key] for key in numbers)


@pytest.mark.parametrize("edit, fragment", [
    (lambda t: t.replace("lanes = { value = 8, source = \"Tang et al. 2023: 8 neuron processing elements (NPE) per core\" }", "lanes = 8"), "gives no source"),
    (lambda t: t.replace('synaptic_op_pj = { value = 2.8,', 'synaptic_op_pj = { value = -2.8,'), "must be at least 0"),
    (lambda t: t.replace('kind = "neuromorphic"', 'kind = "gpu"'), "not a 'neuromorphic' one"),
    (lambda t: "\n".join(line for line in t.splitlines() if not line.startswith("barrier_s")), "missing key 'timing.barrier_s'"),
    (lambda t: t + "\n[broken", "not valid TOML"),
])
def test_bad_chip_model_is_refused_in_one_sentence(tmp_path, edit, fragment):
    from targets.hardware import HERE

    path = tmp_path / "chip.toml"
    path.write_text(edit((HERE / "seneca.toml").read_text()))
    with pytest.raises(SparseccError, match=fragment):
        load_chip(str(path))


def test_cli_rejects_a_bad_chip_and_chips_on_cpu(capsys, tmp_path):
    from test_cli import assert_one_sentence_error, sparsecc

    model = mlp(tmp_path / "m.onnx", [np.ones((4, 4))])
    code, _, err = sparsecc(capsys, "compile", str(model), "-t", "neuro:nosuchchip", "-o", str(tmp_path / "a.sccx"))
    assert_one_sentence_error(code, err, "unknown neuromorphic hardware model 'nosuchchip'")
    code, _, err = sparsecc(capsys, "compile", str(model), "-t", "cpu", "--chips", "2", "-o", str(tmp_path / "a.sccx"))
    assert_one_sentence_error(code, err, "--chips applies to neuro:<chip> targets")
    assert not (tmp_path / "a.sccx").exists()
    code, out, err = sparsecc(capsys, "compile", str(model), "-t", f"neuro:{small_chip(tmp_path, 4096)}", "-o", str(tmp_path / "a.sccx"))
    assert code == 0, err
    assert runtime.load(tmp_path / "a.sccx").chip["memory_bytes"] == 4096


# --- mapping ---------------------------------------------------------------------------------

def test_layers_too_big_for_a_core_are_split_and_still_exact(tmp_path):
    rng = np.random.default_rng(0)
    weights = [rng.standard_normal((64, 96)) * (rng.random((64, 96)) < 0.5), rng.standard_normal((96, 32))]
    onnx_path = mlp(tmp_path / "m.onnx", weights)
    # 4 KB cores: layer 0 (about 3 K synapses of 4 bytes) needs several cores.
    model = compile_neuro(onnx_path, tmp_path / "m.sccx", small_chip(tmp_path, 4096))
    placements = [layer["placement"] for layer in model.manifest.target["layers"]]
    assert len(placements[0]["cores"]) >= 3 and len(placements[1]["cores"]) >= 3
    assert all(size <= 4096 for p in placements for size in p["bytes"])
    assert placements[0]["columns"][0] == 0 and placements[0]["columns"][-1] == 96
    x = rng.standard_normal((1, 64)).astype(np.float32)
    np.testing.assert_allclose(model.run({"x": x})["y"], onnxruntime_reference(onnx_path, {"x": x})[0], atol=ATOL, rtol=0)


def test_a_model_too_big_for_the_chips_is_refused_with_the_cores_it_needs(tmp_path):
    rng = np.random.default_rng(0)
    onnx_path = mlp(tmp_path / "m.onnx", [rng.standard_normal((64, 256)), rng.standard_normal((256, 64))])
    chip = small_chip(tmp_path, 4096, columns=2, rows=2)
    with pytest.raises(SparseccError, match=r"needs \d+ cores of seneca but 1 chip\(s\) have 4; compile with --chips \d+"):
        compile_neuro(onnx_path, tmp_path / "m.sccx", chip)
    assert not (tmp_path / "m.sccx").exists()
    message = ""
    try:
        compile_neuro(onnx_path, tmp_path / "m.sccx", chip)
    except SparseccError as exc:
        message = str(exc)
    chips = int(message.rsplit("--chips ", 1)[1].split()[0])
    model = compile_neuro(onnx_path, tmp_path / "m.sccx", chip, chips=chips)
    assert model.manifest.target["cores_used"] <= 4 * chips
    x = rng.standard_normal((1, 64)).astype(np.float32)
    np.testing.assert_allclose(model.run({"x": x})["y"], onnxruntime_reference(onnx_path, {"x": x})[0], atol=ATOL, rtol=0)


# --- execution against onnxruntime -------------------------------------------------------------

@pytest.mark.parametrize("chip", ["seneca", "loihi2"])
def test_tiny_llama_runs_event_by_event_equal_to_onnxruntime(tmp_path, exported, chip):
    onnx_path = exported("tiny-llama", 0.5, 4)
    model = compile_neuro(onnx_path, tmp_path / "tiny.sccx", chip)
    ids = np.random.default_rng(1).integers(0, 512, size=(1, 4)).astype(np.int64)
    ours = model.run({"input_ids": ids})["logits"]
    reference = onnxruntime_reference(onnx_path, {"input_ids": ids})[0]
    np.testing.assert_allclose(ours, reference, atol=ATOL, rtol=0)


@pytest.mark.slow
def test_gated_tiny_llama_matches_its_gated_onnx_and_cli_run(capsys, tmp_path, exported):
    from test_cli import sparsecc

    onnx_path = exported("tiny-llama", 0.5, 1)
    artifact, dump = tmp_path / "gated.sccx", tmp_path / "dump"
    code, out, err = sparsecc(capsys, "compile", str(onnx_path), "-t", "neuro:seneca", "-o", str(artifact),
                              "--activation-sparsity", "0.5", "--calib", "pydoc", "--calib-tokens", "256",
                              "--dump-dir", str(dump))
    assert code == 0, err
    gated_onnx = sparse_onnx_dump(dump)
    ids = np.array([[17]], np.int64)
    np.save(tmp_path / "ids.npy", ids)
    code, _, err = sparsecc(capsys, "run", str(artifact), "--input", f"input_ids={tmp_path / 'ids.npy'}", "-o", str(tmp_path / "out.npz"))
    assert code == 0, err
    ours = np.load(tmp_path / "out.npz")["logits"]
    np.testing.assert_allclose(ours, onnxruntime_reference(gated_onnx, {"input_ids": ids})[0], atol=ATOL, rtol=0)
    layers = runtime.load(artifact).manifest.target["layers"]
    assert sum(layer["gate"] == "threshold" for layer in layers) >= 6


# --- profile -----------------------------------------------------------------------------------

def test_profile_json_and_plots(capsys, tmp_path, exported):
    from test_cli import sparsecc

    artifact = tmp_path / "tiny.sccx"
    compile_neuro(exported("tiny-llama", 0.5, 4), artifact)
    code, out, err = sparsecc(capsys, "profile", str(artifact), "--json", str(tmp_path / "p.json"), "--plot", str(tmp_path / "plots"))
    assert code == 0, err
    report = json.loads((tmp_path / "p.json").read_text())
    for key in ("latency_s", "energy_j", "energy_by_component", "synaptic_ops", "events", "cores_used", "utilisation", "bottleneck"):
        assert key in report
    assert report["bottleneck"] in ("compute", "memory", "traffic")
    assert abs(sum(report["energy_by_component"].values()) - report["energy_j"]) < 1e-12
    assert report["cores_used"] == 15 and len(report["utilisation"]) == 64
    # Two blocks of (q/k/v, o, gate/up, down) and the head: layers reading one input share a step.
    assert report["steps"] == 9
    assert max(report["utilisation"]) <= 1.0 and max(report["memory_fill"]) <= 1.0
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == ["energy.png", "memory.png", "utilisation.png"]
    assert "bottleneck" in out and "latency" in out


# --- the numbers behave as physics says ----------------------------------------------------------

def _profile(model, x):
    _, counts = model.simulate({"x": x})
    return estimate(model.manifest.target, [count.to_dict() for count in counts]), counts


def test_synaptic_ops_equal_the_nonzero_weights_touched_by_events(tmp_path):
    rng = np.random.default_rng(2)
    weights = [rng.standard_normal((48, 80)) * (rng.random((48, 80)) < 0.3), rng.standard_normal((80, 24)) * (rng.random((80, 24)) < 0.6)]
    model = compile_neuro(mlp(tmp_path / "m.onnx", weights), tmp_path / "m.sccx", small_chip(tmp_path, 2048, 4, 4))
    x = rng.standard_normal((1, 48)).astype(np.float32) * (rng.random((1, 48)) < 0.4)
    report, counts = _profile(model, x)
    # Independently: layer 0's events are the nonzero inputs, layer 1's the nonzero ReLU outputs.
    hidden = np.maximum(x @ weights[0].astype(np.float32), 0)
    expected = [sum(np.count_nonzero(weights[0][k]) for k in np.nonzero(x[0])[0]),
                sum(np.count_nonzero(weights[1][k]) for k in np.nonzero(hidden[0])[0])]
    assert [int(c.synaptic_ops.sum()) for c in counts] == expected
    assert report["synaptic_ops"] == sum(expected)
    assert [c.events for c in counts] == [np.count_nonzero(x), np.count_nonzero(hidden)]


def test_energy_falls_with_activation_sparsity_less_than_linearly(tmp_path):
    rng = np.random.default_rng(3)
    model = compile_neuro(mlp(tmp_path / "m.onnx", [rng.standard_normal((256, 256))]), tmp_path / "m.sccx")
    x = rng.standard_normal((1, 256)).astype(np.float32)
    order = rng.permutation(256)
    energies = []
    for sparsity in (0.0, 0.2, 0.4, 0.6, 0.8):
        sparse_x = x.copy()
        sparse_x[0, order[: int(sparsity * 256)]] = 0
        energies.append(_profile(model, sparse_x)[0]["energy_j"])
        if sparsity:
            # Energy falls, but by less than the fraction of inputs removed: neuron updates,
            # controllers and static power do not shrink.
            assert energies[-1] < energies[-2]
            assert energies[-1] / energies[0] > 1 - sparsity


def test_event_driven_costs_more_than_dense_at_zero_sparsity(tmp_path):
    rng = np.random.default_rng(4)
    model = compile_neuro(mlp(tmp_path / "m.onnx", [rng.standard_normal((128, 192))]), tmp_path / "m.sccx")
    x = rng.standard_normal((1, 128)).astype(np.float32)  # no zeros
    report, _ = _profile(model, x)
    dense = report["dense_equivalent"]
    assert report["energy_j"] > dense["energy_j"]
    assert report["energy_by_component"]["synaptic"] == pytest.approx(dense["energy_by_component"]["synaptic"])
    assert report["energy_by_component"]["memory"] > dense["energy_by_component"]["memory"]  # indices


def test_halving_the_nonzero_weights_halves_synaptic_energy(tmp_path):
    rng = np.random.default_rng(5)
    dense = rng.standard_normal((96, 64))
    keep = np.zeros_like(dense, bool)
    for row in keep:
        row[rng.permutation(64)[:32]] = True  # 50 % sparsity, 32 nonzeros per row
    half = keep.copy()
    for row in half:
        row[np.nonzero(row)[0][::2]] = False  # 75 %: every row loses exactly half of its nonzeros
    x = rng.standard_normal((1, 96)).astype(np.float32)
    energies = []
    for name, mask in (("a", keep), ("b", half)):
        model = compile_neuro(mlp(tmp_path / f"{name}.onnx", [dense * mask]), tmp_path / f"{name}.sccx")
        energies.append(_profile(model, x)[0]["energy_by_component"]["synaptic"])
    assert energies[1] / energies[0] == pytest.approx(0.5, rel=1e-12)


# --- NIR export ----------------------------------------------------------------------------------

def test_nir_export_round_trips_the_synaptic_layers(capsys, tmp_path):
    nir = pytest.importorskip("nir")
    from test_cli import sparsecc

    rng = np.random.default_rng(6)
    weights = [rng.standard_normal((32, 48)) * (rng.random((32, 48)) < 0.5), rng.standard_normal((48, 16))]
    onnx_path = mlp(tmp_path / "m.onnx", weights)
    (tmp_path / "t.json").write_text(json.dumps({"x": 0.5}))
    compile_neuro(onnx_path, tmp_path / "m.sccx", small_chip(tmp_path, 4096), thresholds=str(tmp_path / "t.json"))
    code, out, err = sparsecc(capsys, "export-nir", str(tmp_path / "m.sccx"), "-o", str(tmp_path / "m.nir"))
    assert code == 0, err
    assert "2 linear layers" in out and "1 graded activation gates" in out and "Relu x1" in out
    graph = nir.read(tmp_path / "m.nir")
    linear = [graph.nodes["layer0"], graph.nodes["layer1"]]
    assert all(type(node).__name__ == "Linear" for node in linear)
    for node, weight in zip(linear, weights):
        np.testing.assert_array_equal(node.weight, weight.astype(np.float32).T)
    assert linear[0].metadata["sparsecc_gate"] == "threshold"
    np.testing.assert_allclose(linear[0].metadata["sparsecc_threshold"], [0.5])
    assert ("input0", "layer0") in graph.edges and ("layer1", "output1") in graph.edges


def test_nir_export_without_nir_says_how_to_install_it(capsys, tmp_path, monkeypatch):
    import sys

    from test_cli import assert_one_sentence_error, sparsecc

    compile_neuro(mlp(tmp_path / "m.onnx", [np.ones((4, 4))]), tmp_path / "m.sccx")
    monkeypatch.setitem(sys.modules, "nir", None)
    code, _, err = sparsecc(capsys, "export-nir", str(tmp_path / "m.sccx"), "-o", str(tmp_path / "m.nir"))
    assert_one_sentence_error(code, err, "pip install nir==1.0.8")
    assert not (tmp_path / "m.nir").exists()


# --- SmolLM2-135M on the chip model -----------------------------------------------------------------

@pytest.mark.model
@pytest.mark.slow
def test_smollm2_one_token_on_seneca_matches_onnxruntime(tmp_path):
    """The whole trained model (one-token graph, 50 % pruned) placed on 40 SENECA chips.

    Tolerance as in test_smollm2.py: logits reach ~40, and 576- and 1536-long sums in
    another order give errors of a few 1e-4; 2e-3 absolute, and the top-1 token must agree.
    """
    from compiler.export import ExportOptions, export

    onnx_path = tmp_path / "smollm2.onnx"
    export(ExportOptions("smollm2-135m", str(onnx_path), prune_magnitude=0.5, seq_len=1), progress=lambda *_: None)
    with pytest.raises(SparseccError, match=r"needs \d+ cores of seneca but 1 chip\(s\) have 64"):
        compile_neuro(onnx_path, tmp_path / "one-chip.sccx")
    model = compile_neuro(onnx_path, tmp_path / "smollm2.sccx", chips=40)
    ids = np.array([[1542]], np.int64)
    ours, counts = model.simulate({"input_ids": ids})
    reference = onnxruntime_reference(onnx_path, {"input_ids": ids})[0]
    np.testing.assert_allclose(ours["logits"], reference, atol=2e-3, rtol=0)
    assert ours["logits"].argmax() == reference.argmax()
    assert len(counts) == 211  # 30 blocks x (q, k, v, o, gate, up, down) and the tied head
    report = estimate(model.manifest.target, [c.to_dict() for c in counts])
    assert report["steps"] == 30 * 4 + 1
