"""``sparsify --activations dynk``: dynamic-k experts (D2DMoE) on tiny-llama, the router
fit, the expert clustering, tau, and the routing rule the graph computes."""

import numpy as np
import onnx.parser
import pytest
from onnx import numpy_helper

from compiler.evaluate import perplexity
from compiler.onnx_io import load_model
from conftest import onnxruntime_reference
from passes.insert_expert_routers import (Router, find_expert_routers, insert_expert_routers, remove_expert_routers,
                                          tensor_names)
from passes.insert_activation_gates import probe_session
from sparsify import dynk
from sparsify.run import SparsifyOptions, sparsify
from test_sparsify import assert_runs, feeds_for, run


def skipped_per_token(model, summary):
    """[tokens, MLPs] fraction of experts not run, running ``model`` on the calibration feeds."""
    names = [tensor_names(neurons)["mask"] for neurons in summary["activation_sparsity"]["gates"]]
    session = probe_session(model, names)
    rows = [np.stack([1 - m.reshape(-1, m.shape[-1]).mean(axis=1) for m in session.run(names, feed)], axis=1)
            for feed in feeds_for(model)]
    return np.concatenate(rows), names


def test_dynk_skips_the_asked_fraction_of_experts(exported, tmp_path):
    model, summary = run(exported, tmp_path, activations="dynk:0.5")
    skipped, names = skipped_per_token(model, summary)
    assert names == ["mul_11_experts", "mul_20_experts"]  # the two MLPs' down inputs
    assert abs(skipped.mean() - 0.5) < 0.01  # measured here, on the routed model
    assert skipped.std() > 0  # dynamic k: tokens differ in how many experts run
    mlps = summary["activation_sparsity"]["gates"]
    assert [m["experts"] for m in mlps.values()] == [22, 22]  # I = 176: the divisor nearest 176 / 8
    assert all(abs(m["calibrated"] - 0.5) < 0.01 and 0 < m["tau"] < 1 for m in mlps.values())  # a tau per MLP
    assert skipped.mean(axis=0) == pytest.approx([m["calibrated"] for m in mlps.values()])
    assert all(0.3 < m["router_r2"] <= 1 for m in mlps.values())
    assert abs(summary["activation_sparsity"]["sparsity"] - 0.5) < 0.01
    # the exact gate on each down input sees at least the skipped experts' zeros
    measured = summary["activation_sparsity"]["measured"]
    assert sorted(measured) == ["mul_11_routed_gated", "mul_20_routed_gated"]
    assert all(measured[f"{name}_routed_gated"] >= mlp["calibrated"] - 1e-6 for name, mlp in mlps.items())
    assert [n.op_type for n in model.graph.node].count("ActivationGate") == 2
    assert_runs(model)


def test_dynk_global_uses_one_tau(exported, tmp_path):
    model, summary = run(exported, tmp_path, activations="dynk:0.5:global")
    mlps = summary["activation_sparsity"]["gates"]
    assert len({m["tau"] for m in mlps.values()}) == 1
    skipped, _ = skipped_per_token(model, summary)
    assert abs(skipped.mean() - 0.5) < 0.01  # on average over the MLPs, not in each


def test_dynk_topk_runs_a_fixed_number_of_experts(exported, tmp_path):
    model, summary = run(exported, tmp_path, activations="dynk:0.5:topk")
    skipped, _ = skipped_per_token(model, summary)
    assert np.all(skipped == 0.5)  # top 11 of 22 for every token
    assert [m["top_k"] for m in summary["activation_sparsity"]["gates"].values()] == [11, 11]


def test_dynk_same_seed_same_bytes(exported, tmp_path):
    first, _ = run(exported, tmp_path, "a", activations="dynk:0.4", seed=2)
    second, _ = run(exported, tmp_path, "b", activations="dynk:0.4", seed=2)
    other, _ = run(exported, tmp_path, "c", activations="dynk:0.4", seed=3)
    assert first.SerializeToString() == second.SerializeToString()
    assert first.SerializeToString() != other.SerializeToString()


def test_pruning_a_dynk_model_leaves_its_routers_alone(exported, tmp_path):
    routed, _ = run(exported, tmp_path, "routed", activations="dynk:0.5")
    before = find_expert_routers(routed)
    pruned = tmp_path / "pruned.onnx"
    summary = sparsify(SparsifyOptions(str(tmp_path / "routed.onnx"), str(pruned), weights="magnitude:0.5"))
    after = find_expert_routers(load_model(pruned))
    assert len(after) == len(before) == 2
    assert all(np.array_equal(a.weight, b.weight) and np.array_equal(a.bias, b.bias) for a, b in zip(after, before))
    layers = summary["weight_sparsity"]["layers"]
    assert len(layers) == 14 and not any(name.endswith("_router_weight") for name in layers)  # 7 a block
    assert abs(summary["weight_sparsity"]["sparsity"] - 0.5) < 1e-3


def test_dynk_compiled_and_onnx_eval_agree(exported, tmp_path):
    from compiler.driver import CompileOptions, compile_model

    run(exported, tmp_path, "routed", activations="dynk:0.5")
    artifact = tmp_path / "routed.sccx"
    summary = compile_model(CompileOptions(str(tmp_path / "routed.onnx"), str(artifact), explain=True))
    fused = [line for line in summary["explanations"] if line.startswith("fuse_gated_matmul") and "GatedMatMul" in line]
    assert len(fused) == 2  # both down projections skip the rows of inactive experts
    onnx_report = perplexity(str(tmp_path / "routed.onnx"), "pydoc", 512)
    artifact_report = perplexity(str(artifact), "pydoc", 512)
    assert onnx_report["tokens"] == artifact_report["tokens"] == 32 * 15
    # float32 sums in another order; a token near tau could flip an expert, hence 0.5 %
    assert abs(artifact_report["perplexity"] / onnx_report["perplexity"] - 1) < 0.005


def test_ridge_solve_matches_least_squares():
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((40, 5)), rng.standard_normal((40, 3))
    ones = np.ones((40, 1))
    weight, bias = dynk.ridge_solve(x, y, 0.0)
    expected = np.linalg.lstsq(np.hstack([x, ones]), y, rcond=None)[0]
    np.testing.assert_allclose(weight, expected[:5], atol=1e-10)
    np.testing.assert_allclose(bias, expected[5], atol=1e-10)
    # ridge: least squares on [x - mean; sqrt(ridge) I] (the bias absorbs the means)
    weight, bias = dynk.ridge_solve(x, y, 3.0)
    augmented = np.vstack([x - x.mean(axis=0), np.sqrt(3.0) * np.eye(5)])
    target = np.vstack([y - y.mean(axis=0), np.zeros((5, 3))])
    np.testing.assert_allclose(weight, np.linalg.lstsq(augmented, target, rcond=None)[0], atol=1e-10)
    np.testing.assert_allclose(bias, y.mean(axis=0) - x.mean(axis=0) @ weight, atol=1e-10)


def test_router_fit_recovers_a_linear_target():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((500, 6))
    norms = x @ rng.standard_normal((6, 4)) + 2.0
    fit = dynk.fit_router(x, norms + 0.01 * rng.standard_normal(norms.shape))
    assert fit.r2 > 0.99
    fit = dynk.fit_router(x, rng.standard_normal(norms.shape))  # noise: nothing to predict
    assert fit.r2 < 0.05


def test_clustering_finds_planted_co_active_groups():
    rng = np.random.default_rng(2)
    tokens, groups = 300, rng.permutation(np.repeat(np.arange(4), 6))  # 24 neurons, 4 planted groups
    active = rng.random((tokens, 4)) < 0.3  # which group fires on which token
    activations = active[:, groups] * rng.uniform(0.5, 1.5, (tokens, 24)) + 0.01 * rng.standard_normal((tokens, 24))
    assignment = dynk.cluster_neurons(activations, 4, seed=0)
    assert np.bincount(assignment).tolist() == [6, 6, 6, 6]
    assert all(len(set(assignment[groups == g])) == 1 for g in range(4))


def test_expert_count_and_norms():
    assert dynk.expert_count(1536) == 192 and dynk.expert_count(176) == 22 and dynk.expert_count(7) == 1
    h = np.array([[1.0, 2.0, 0.0, 3.0]])
    down = np.array([[1.0, 0.0], [0.0, 1.0], [5.0, 5.0], [1.0, 1.0]])
    norms = dynk.expert_norms(h, down, np.array([0, 0, 1, 1]), 2)
    np.testing.assert_allclose(norms, [[np.sqrt(5.0), np.sqrt(18.0)]])


def test_tau_skips_the_level_of_all_experts():
    rng = np.random.default_rng(3)
    scores = [rng.random((200, 8)), rng.random((100, 8)) ** 3]
    tau = dynk.calibrate_tau(scores, 0.6)
    skipped = np.concatenate([~dynk.run_mask(s, tau) for s in scores]).mean()
    assert skipped == pytest.approx(0.6, abs=1 / 2400)
    assert dynk.calibrate_tau(scores, 0.0) == 0.0


ROUTED = """
<ir_version: 10, opset_import: ["" : 18]>
mlp (float[2, 3] x, float[2, 6] h) => (float[2, 4] y) <float[6, 4] down> {
    neurons = Identity(h)
    y = MatMul(neurons, down)
}
"""


@pytest.mark.parametrize("rule", ["threshold", "topk"])
def test_routed_graph_runs_exactly_the_experts_above_tau_max(rule):
    model = onnx.parser.parse_model(ROUTED)
    rng = np.random.default_rng(4)
    down = rng.standard_normal((6, 4)).astype(np.float32)
    model.graph.initializer.append(numpy_helper.from_array(down, "down"))
    # Router weight I, bias 0: the scores are Relu(x); two neurons per expert.
    router = Router("x", "neurons", np.eye(3), np.zeros(3), np.array([0, 0, 1, 1, 2, 2]),
                    tau=0.5 if rule == "threshold" else None, top_k=1 if rule == "topk" else None)
    result = insert_expert_routers(model, [router])
    assert result.modified
    ops = [n.op_type for n in result.model.graph.node]
    assert "ReduceMax" in ops if rule == "threshold" else "TopK" in ops
    assert next(n for n in result.model.graph.node if n.op_type == "MatMul" and n.input[1] == "down").input[0] == "neurons_routed"
    x = np.array([[1.0, 0.5, 0.49], [-1.0, 2.0, 1.0]], np.float32)  # token 2: expert 0 scores Relu(-1) = 0
    h = rng.standard_normal((2, 6)).astype(np.float32)
    expected_runs = [[1, 1, 0], [0, 1, 1]] if rule == "threshold" else [[1, 0, 0], [0, 1, 0]]
    y, runs = probe_session(result.model, ["neurons_experts"]).run(["y", "neurons_experts"], {"x": x, "h": h})
    assert runs.tolist() == expected_runs
    assert dynk.run_mask(np.maximum(x, 0), router.tau, router.top_k).astype(int).tolist() == expected_runs
    keep = np.repeat(np.array(expected_runs, np.float32), 2, axis=1)
    np.testing.assert_allclose(y, (h * keep) @ down, rtol=1e-6)
    assert onnxruntime_reference(result.model, {"x": x, "h": h})[0].shape == (2, 4)


@pytest.mark.parametrize("rule", ["threshold", "topk"])
def test_routers_are_found_with_their_parameters_and_removed(rule):
    """find_expert_routers reads back exactly what was inserted, remove_expert_routers gives
    back the graph before (nodes and initializers), and an edited router is not one."""
    model = onnx.parser.parse_model(ROUTED)
    model.graph.initializer.append(numpy_helper.from_array(np.ones((6, 4), np.float32), "down"))
    original = model.SerializeToString()
    router = Router("x", "neurons", np.arange(9, dtype=np.float32).reshape(3, 3), np.ones(3, np.float32),
                    np.array([0, 0, 1, 1, 2, 2]), tau=0.25 if rule == "threshold" else None, top_k=2 if rule == "topk" else None)
    insert_expert_routers(model, [router])
    [found] = find_expert_routers(model)
    assert (found.hidden, found.neurons, found.tau, found.top_k) == (router.hidden, router.neurons, router.tau, router.top_k)
    for got, want in [(found.weight, router.weight), (found.bias, router.bias), (found.expert_of_neuron, router.expert_of_neuron)]:
        np.testing.assert_array_equal(got, want)
    edited = onnx.ModelProto()
    edited.CopyFrom(model)
    next(n for n in edited.graph.node if n.op_type == "GreaterOrEqual").op_type = "Greater"
    assert find_expert_routers(edited) == []
    assert remove_expert_routers(model, [found]).modified
    assert model.SerializeToString() == original
