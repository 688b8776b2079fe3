"""``sparsecc sparsify --like``: a sparsified seq-16 tiny-llama copied onto its ``--decode``
export: the same weights, ReLUs, gates and dynk expert routers in both graphs, the same
logits in onnxruntime (and, for dynk, in the compiled decoder), and refusals as one sentence."""

import hashlib

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from compiler.export import ExportOptions, export
from compiler.onnx_io import load_model, save_model
from conftest import onnxruntime_reference
from passes.base import Graph
from passes.insert_expert_routers import find_expert_routers
from runtime.decoder import write_cache
from sparsify.graph import get_weight, linear_layers, set_weight
from sparsify.run import SparsifyOptions, sparsify
from test_cli import assert_one_sentence_error, sparsecc

# (weights, activations): unstructured + teal, structured + cats, SiLU made ReLU, dynk's
# expert routers.
SPECS = [("wanda:0.5", "teal:0.4"), ("seap:0.2", "cats:0.5"), (None, "relu"), (None, "dynk:0.5")]
DYNK = [SPECS[3]]


@pytest.fixture(scope="module")
def decode_export(tmp_path_factory):
    path = tmp_path_factory.mktemp("like-decode") / "dec.onnx"
    export(ExportOptions("tiny-llama", str(path), decode=True, max_context=16), progress=lambda *_: None)
    return path


@pytest.fixture(scope="module", params=SPECS, ids=lambda spec: "+".join(filter(None, spec)))
def copied(request, exported, decode_export, tmp_path_factory):
    """(sparsified seq-16 source, the decode export --like it, its prefill graph)."""
    root = tmp_path_factory.mktemp("like")
    weights, activations = request.param
    source = root / "source.onnx"
    sparsify(SparsifyOptions(str(exported("tiny-llama")), str(source), weights, activations, "pydoc", 512))
    out = root / "out.onnx"
    sparsify(SparsifyOptions(str(decode_export), str(out), like=str(source)))
    return source, out, root / "out.prefill.onnx"


def _reader(node, graph):
    """A gate reader's identity across exports: the bytes of the weight a MatMul reads."""
    weight = graph.initializers.get(node.input[1]) if node.op_type == "MatMul" else None
    return hashlib.sha256(numpy_helper.to_array(weight).tobytes()).hexdigest() if weight is not None else node.op_type


def gates(model):
    """Every gate as (mode, threshold, what reads it), sorted."""
    graph = Graph(model.graph)
    found = []
    for node in model.graph.node:
        if node.op_type == "ActivationGate":
            threshold = numpy_helper.to_array(graph.initializers[node.input[1]]).item() if node.overload == "threshold" else None
            found.append((node.overload, threshold, tuple(sorted(_reader(r, graph) for r in graph.consumers[node.output[0]]))))
    return sorted(found, key=repr)


def routers(model):
    """Every expert router as (weight, bias, grouping, tau, top-k), in graph order."""
    return [(r.weight.tobytes(), r.bias.tobytes(), r.expert_of_neuron.tobytes(), r.tau, r.top_k)
            for r in find_expert_routers(model)]


def test_like_copies_weights_relus_and_gates_exactly(copied):
    source, *targets = (load_model(path) for path in copied)
    source_weights = [get_weight(source, layer) for layer in linear_layers(source)]
    assert any((w == 0).any() for w in source_weights) or any(n.op_type == "Relu" for n in source.graph.node)
    for target in targets:
        weights = [get_weight(target, layer) for layer in linear_layers(target)]
        # tiny-llama's 14; routers are not prunable layers and are compared below
        assert len(weights) == len(source_weights) == 14
        for got, want in zip(weights, source_weights):
            np.testing.assert_array_equal(got, want)
        assert gates(target) == gates(source) and gates(source)
        assert routers(target) == routers(source)
        count = lambda model, op: sum(node.op_type == op for node in model.graph.node)  # noqa: E731
        assert (count(target, "Relu"), count(target, "Sigmoid")) == (count(source, "Relu"), count(source, "Sigmoid"))


def _decode_logits(decode_path, ids):
    """Logits of ``ids`` [1, 16]: the prefill graph on the first 8, then 8 decode steps."""
    decode = load_model(decode_path)
    cache = {v.name: np.zeros([d.dim_value for d in v.type.tensor_type.shape.dim], np.float32)
             for v in decode.graph.input if v.name.startswith("past_")}
    layers = range(len(cache) // 2)

    def step(model, tokens, position):
        logits, keys, values = onnxruntime_reference(model, {"input_ids": tokens, "position": np.array([position]), **cache})
        write_cache([cache[f"past_key_{i}"] for i in layers], [cache[f"past_value_{i}"] for i in layers],
                    keys, values, position, tokens.shape[1])
        return logits[0]

    prefill = load_model(decode_path.with_name(decode_path.name.replace(".onnx", ".prefill.onnx")))
    rows = [step(prefill, ids[:, :8], 0)] + [step(decode, ids[:, p:p + 1], p) for p in range(8, 16)]
    return np.concatenate(rows)


def test_decode_export_like_the_source_gives_its_logits(copied, decode_export, token_ids):
    """The two exports order attention's sums differently (cache and new keys joined before
    the softmax), so logits (|logit| < 1 for tiny-llama) differ by float32 rounding, about
    1e-7; 1e-5 leaves room for it, while a weight, gate or router that is not copied moves
    them by more than 1e-2 (the dense decode export against the source shows it)."""
    source, out, _ = copied
    reference = onnxruntime_reference(load_model(source), {"input_ids": token_ids})[0][0]
    np.testing.assert_allclose(_decode_logits(out, token_ids), reference, rtol=0, atol=1e-5)
    assert np.abs(_decode_logits(decode_export, token_ids) - reference).max() > 1e-2


def _chain_of_matmuls(path, count, size):
    """An ONNX model of ``count`` MatMuls with [size, size] weights, one after another."""
    nodes, inits = [], []
    for i in range(count):
        inits.append(numpy_helper.from_array(np.ones((size, size), np.float32), f"w{i}"))
        nodes.append(helper.make_node("MatMul", [f"x{i}", f"w{i}"], [f"x{i + 1}"]))
    nodes.append(helper.make_node("Relu", [f"x{count}"], ["y"]))
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x0", onnx.TensorProto.FLOAT, [1, size])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, size])], inits)
    save_model(helper.make_model(graph), path)


@pytest.mark.parametrize("copied", [SPECS[0]], indirect=True, ids=["wanda:0.5+teal:0.4"])
def test_bad_like_models_are_refused_in_one_sentence(copied, decode_export, tmp_path, capsys):
    source, out, _ = copied
    _chain_of_matmuls(tmp_path / "two.onnx", 2, 8)
    _chain_of_matmuls(tmp_path / "fourteen.onnx", 14, 8)
    tampered = load_model(source)
    layer = linear_layers(tampered)[0]
    weight = get_weight(tampered, layer).copy()
    weight[np.unravel_index(np.flatnonzero(weight)[0], weight.shape)] *= 2
    set_weight(tampered, layer, weight)
    save_model(tampered, tmp_path / "tampered.onnx")
    target = str(decode_export)
    for like, model, message in [
        (tmp_path / "missing.onnx", target, "missing.onnx: no such file."),
        (tmp_path / "two.onnx", target, "has 2 prunable linear layers and"),
        (tmp_path / "fourteen.onnx", target, "its linear layer 0 of shape [8, 8] matches no remaining linear layer"),
        (tmp_path / "tampered.onnx", target, "it was not sparsified from the same model"),
        (source, str(out), "already has activation gates"),
    ]:
        code, _, err = sparsecc(capsys, "sparsify", model, "-o", str(tmp_path / "x.onnx"), "--like", str(like))
        assert_one_sentence_error(code, err, message)
    code, _, err = sparsecc(capsys, "sparsify", target, "-o", str(tmp_path / "x.onnx"), "--like", str(source), "--weights", "wanda:0.5")
    assert_one_sentence_error(code, err, "give it alone")
    assert not (tmp_path / "x.onnx").exists()


@pytest.mark.parametrize("copied", DYNK, indirect=True, ids=["dynk:0.5"])
def test_dynk_routers_copied_onto_a_shorter_export_give_the_same_logits(copied, exported, token_ids, tmp_path, capsys):
    """On an 8-token export the routers are the nodes a direct dynk writes (node for node,
    as in the source), and its logits are the source's on the first 8 tokens. Both graphs
    compute each token's row with the same operations (the causal mask zeroes the later
    keys), so they agree to float32 rounding of attention's sums; 1e-5 as above, while the
    routers' skipped experts move the logits by more than 1e-2."""
    source, _, _ = copied
    out = tmp_path / "short.onnx"
    code, printed, _ = sparsecc(capsys, "sparsify", str(exported("tiny-llama", seq_len=8)), "-o", str(out), "--like", str(source))
    assert code == 0 and "2 activation gates, 2 expert routers" in printed
    source_model, short = load_model(source), load_model(out)
    assert len(routers(short)) == 2 and routers(short) == routers(source_model)
    assert [node.op_type for node in short.graph.node] == [node.op_type for node in source_model.graph.node]
    reference = onnxruntime_reference(source_model, {"input_ids": token_ids})[0][0][:8]
    np.testing.assert_allclose(onnxruntime_reference(short, {"input_ids": token_ids[:, :8]})[0][0], reference, rtol=0, atol=1e-5)
    dense = onnxruntime_reference(load_model(exported("tiny-llama", seq_len=8)), {"input_ids": token_ids[:, :8]})[0][0]
    assert np.abs(dense - reference).max() > 1e-2


@pytest.mark.parametrize("copied", DYNK, indirect=True, ids=["dynk:0.5"])
def test_dynk_decoder_compiles_with_routed_down_projections(copied, tmp_path):
    """Both graphs of the decode export get both routers, ``sparsecc compile`` fuses each
    routed down projection's gate into a GatedMatMul as for a direct dynk model, and the
    compiled decode step, with a filled cache, equals onnxruntime on OUT. Tolerance as in
    test_decode.py: 1e-4 on logits of order 1 (another summation order; the seeded inputs
    put no token's router score next to tau)."""
    import runtime
    from compiler.driver import CompileOptions, compile_model

    _, out, prefill = copied
    assert [len(routers(load_model(path))) for path in (out, prefill)] == [2, 2]
    summary = compile_model(CompileOptions(str(out), str(tmp_path / "dynk.sccx"), explain=True))
    fused = [line for line in summary["explanations"] if "_routed_gate + " in line and "GatedMatMul" in line]
    assert len(fused) == 4  # two down projections in each of the two graphs
    model = runtime.load(tmp_path / "dynk.sccx")
    rng = np.random.default_rng(1)
    feeds = {spec.name: rng.standard_normal(spec.shape).astype(np.float32) for spec in model.inputs if spec.dtype == "float32"}
    feeds.update(input_ids=np.array([[7]], np.int64), position=np.array([12], np.int64))
    ours = model.run(feeds)
    for name, expected in zip(("logits", "new_keys", "new_values"), onnxruntime_reference(out, feeds)):
        np.testing.assert_allclose(ours[name], expected, rtol=0, atol=1e-4)


@pytest.mark.parametrize("copied", DYNK, indirect=True, ids=["dynk:0.5"])
def test_a_router_that_reads_another_tensor_is_refused(copied, decode_export, tmp_path, capsys):
    source, _, _ = copied
    tampered = load_model(source)
    first, second = find_expert_routers(tampered)
    router_matmul = next(node for node in tampered.graph.node if node.op_type == "MatMul" and node.input[0] == second.hidden
                         and node.input[1].endswith("_router_weight"))
    # The other MLP's input, of the same width; the earlier one's, so that the graph stays
    # a valid (acyclic) ONNX graph, which load_model checks.
    router_matmul.input[0] = first.hidden
    save_model(tampered, tmp_path / "tampered.onnx")
    code, _, err = sparsecc(capsys, "sparsify", str(decode_export), "-o", str(tmp_path / "x.onnx"),
                            "--like", str(tmp_path / "tampered.onnx"))
    assert_one_sentence_error(code, err, "does not sit between an MLP's input and its down projection")
