"""targets/legalize.py with the CPU's kernels: Before / Expected golden cases as ONNX text.

Each case is a small graph (Before), the graph legalize must make of it (Expected: the
CPU's private ops, the lifted weights as graph inputs ``weightN``, the initializers that
stay declared as ``<...>``), the arrays lifted (by the CPU kernels' own packing functions,
which their own tests cover: legalize packs with the ``formats`` encoders, and the two
must agree) and the line ``--explain`` shows. The legalized graph holds the
CPU's private ops, which onnxruntime cannot run; so each Before is also compiled and the
artifact compared with onnxruntime on the Before. The kernels sum in another order than
onnxruntime: with K = 32 products of standard normal values (outputs of order 6), 1e-5
relative and absolute is far above that rounding and far below any wrong weight or gate.
Where the legalized graph has only standard ops (a refused Gemm, a lifted constant) it is
run in onnxruntime itself and must equal the Before exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnx.parser
import onnx.printer
import pytest
from onnx import numpy_helper

import formats
import runtime
from conftest import onnxruntime_reference
from passes import sparse_ops
from targets.cpu.kernels import pack_dense_weight
from targets.cpu.legalize import BACKEND
from targets.cpu.sparse_kernels import pack_dual_weight, pack_segment_weight
from targets.legalize import legalize

RELATIVE_TOLERANCE = ABSOLUTE_TOLERANCE = 1e-5
CPU = '"ai.sparsecc.cpu" : 1'
SPARSE = '"ai.sparsecc" : 1'


@dataclass
class Case:
    """before: the model; expected: the legalized graph as ONNX text; lifted: the arrays
    legalize must lift, with the initializer each comes from; explained: a fragment of
    the line ``--explain`` shows; feeds: inputs for the numerical check."""

    before: onnx.ModelProto
    expected: str
    lifted: list[tuple[np.ndarray, str]]
    explained: str
    feeds: dict[str, np.ndarray]


def _before(text: str, arrays: dict[str, np.ndarray]) -> onnx.ModelProto:
    """The model of ``text`` whose declared initializers get ``arrays`` (the parser lists
    declarations without values as value_info), with the ``ai.sparsecc`` reference
    functions it uses."""
    model = onnx.parser.parse_model(text)
    assert sorted(value.name for value in model.graph.value_info) == sorted(arrays)
    del model.graph.value_info[:]
    model.graph.initializer.extend(numpy_helper.from_array(array, name) for name, array in arrays.items())
    return sparse_ops.attach_reference_functions(model)


# numpy dtypes by their names in ONNX text.
TEXT_TYPES = {np.dtype(np.float32): "float", np.dtype(np.int32): "int32", np.dtype(np.int16): "int16",
              np.dtype(np.uint8): "uint8"}


def _shape(array: np.ndarray) -> str:
    """``array``'s type as ONNX text writes it, e.g. ``float[2, 32, 16]``."""
    return f"{TEXT_TYPES[array.dtype]}[{', '.join(map(str, array.shape))}]"


def _declare(arrays: dict[str, np.ndarray]) -> str:
    return ", ".join(f"{_shape(array)} {name}" for name, array in arrays.items())


def _weight(rng, k: int, n: int, sparsity: float = 0.0) -> np.ndarray:
    weight = rng.standard_normal((k, n)).astype(np.float32)
    weight[rng.random((k, n)) < sparsity] = 0
    return weight


def _x(rng, rows: int, k: int = 32) -> dict[str, np.ndarray]:
    return {"x": rng.standard_normal((rows, k)).astype(np.float32)}


def dense_matmul() -> Case:
    rng = np.random.default_rng(0)
    w = _weight(rng, 32, 24)
    panel = pack_dense_weight(w)
    return Case(_before("""
        <ir_version: 10, opset_import: ["" : 18]>
        linear (float[1, 32] x) => (float[1, 24] y) <float[32, 24] w> {
            [lin] y = MatMul (x, w)
        }""", {"w": w}), f"""
        <ir_version: 10, opset_import: ["" : 18, {CPU}]>
        linear (float[1, 32] x, {_shape(panel)} weight0) => (float[1, 24] y) {{
            [lin_panel] y = ai.sparsecc.cpu.PanelMatMul <k: int = 32, n: int = 24> (x, weight0)
        }}""", [(panel, "w")], "cpu: lin [32x24] -> dense kernel.", _x(rng, 1))


def gemm_with_bias() -> Case:
    rng = np.random.default_rng(1)
    w_t, bias = _weight(rng, 24, 32), rng.standard_normal(24).astype(np.float32)
    panel = pack_dense_weight(np.ascontiguousarray(w_t.T))
    return Case(_before("""
        <ir_version: 10, opset_import: ["" : 18]>
        linear (float[2, 32] x) => (float[2, 24] y) <float[24, 32] w, float[24] bias> {
            [lin] y = Gemm <transB: int = 1> (x, w, bias)
        }""", {"w": w_t, "bias": bias}), f"""
        <ir_version: 10, opset_import: ["" : 18, {CPU}]>
        linear (float[2, 32] x, {_shape(panel)} weight0) => (float[2, 24] y) <float[24] bias> {{
            [lin_panel] y_panel = ai.sparsecc.cpu.PanelMatMul <k: int = 32, n: int = 24> (x, weight0)
            [lin_bias] y = Add (y_panel, bias)
        }}""", [(panel, "w")], "cpu: lin [32x24] -> dense kernel.", _x(rng, 2))


def sparse_matmul(rows: int, sparsity: float = 0.8) -> Case:
    """A csr SparseMatMul: of decode size (at most 8 rows) the CPU's sparse kernel, else,
    or when its weight is all zeros (empty arrays), the dense kernel on the decoded weight."""
    rng = np.random.default_rng(2)
    w = _weight(rng, 32, 24, sparsity)
    arrays = dict(zip(("w_indptr", "w_indices", "w_values"), formats.get("csr").encode(w)))
    before = _before(f"""
        <ir_version: 10, opset_import: ["" : 18, {SPARSE}]>
        sparse (float[{rows}, 32] x) => (float[{rows}, 24] y) <{_declare(arrays)}> {{
            [lin] y = ai.sparsecc.SparseMatMul:csr <shape: ints = [32, 24]> (x, w_indptr, w_indices, w_values)
        }}""", arrays)
    if rows <= BACKEND.max_rows and w.any():
        lifted = [(array, f"w_values:{part}") for array, part in zip(arrays.values(), "abc")]
        return Case(before, f"""
            <ir_version: 10, opset_import: ["" : 18, {SPARSE}, {CPU}]>
            sparse (float[{rows}, 32] x, {_declare({f"weight{i}": a for i, (a, _) in enumerate(lifted)})}) => (float[{rows}, 24] y) {{
                [lin] y = ai.sparsecc.cpu.CpuSparseMatMul <format: string = "csr", k: int = 32, n: int = 24> (x, weight0, weight1, weight2)
            }}""", lifted, "cpu: lin [32x24] -> csr sparse kernel.", _x(rng, rows))
    panel = pack_dense_weight(w)
    return Case(before, f"""
        <ir_version: 10, opset_import: ["" : 18, {SPARSE}, {CPU}]>
        sparse (float[{rows}, 32] x, {_shape(panel)} weight0) => (float[{rows}, 24] y) {{
            [lin_panel] y = ai.sparsecc.cpu.PanelMatMul <k: int = 32, n: int = 24> (x, weight0)
        }}""", [(panel, "w_values")], "-> dense kernel on the decoded weight (" + (
            f"{rows} rows, more than the 8 the sparse kernels take" if w.any() else "all its weights are zero"), _x(rng, rows))


def gated_dense(rows: int) -> Case:
    """A GatedMatMul on a dense weight: of decode size the gated kernel on the weight as it
    is, else the gate in standard ops and the dense kernel."""
    rng = np.random.default_rng(3)
    w, t = _weight(rng, 32, 24), np.array([0.5], np.float32)
    before = _before(f"""
        <ir_version: 10, opset_import: ["" : 18, {SPARSE}]>
        gated (float[{rows}, 32] x) => (float[{rows}, 24] y) <float[1] t, float[32, 24] w> {{
            [lin] y = ai.sparsecc.GatedMatMul:threshold_dense <shape: ints = [32, 24]> (x, t, w)
        }}""", {"t": t, "w": w})
    if rows <= BACKEND.max_rows:
        return Case(before, f"""
            <ir_version: 10, opset_import: ["" : 18, {SPARSE}, {CPU}]>
            gated (float[{rows}, 32] x, float[32, 24] weight0) => (float[{rows}, 24] y) <float[1] t> {{
                [lin] y = ai.sparsecc.cpu.CpuGatedMatMul <dual: int = 0, k: int = 32, n: int = 24> (x, t, weight0)
            }}""", [(w, "w")], "cpu: lin [32x24] -> gated kernel", _x(rng, rows))
    panel = pack_dense_weight(w)
    return Case(before, f"""
        <ir_version: 10, opset_import: ["" : 18, {SPARSE}, {CPU}]>
        gated (float[{rows}, 32] x, {_shape(panel)} weight0) => (float[{rows}, 24] y) <float[1] t> {{
            [lin_gate_abs] lin_gate_abs = Abs (x)
            [lin_gate_active] lin_gate_active = Greater (lin_gate_abs, t)
            [lin_gate_mask] lin_gate_mask = Cast <to: int = 1> (lin_gate_active)
            [lin_gate] y_gated_input = Mul (x, lin_gate_mask)
            [lin_panel] y = ai.sparsecc.cpu.PanelMatMul <k: int = 32, n: int = 24> (y_gated_input, weight0)
        }}""", [(panel, "w")], f"-> dense kernel on the decoded weight ({rows} rows", _x(rng, rows))


def gated_sparse(layout: str) -> Case:
    """A GatedMatMul on a bitmask weight becomes the dual-sparse kernel over whichever
    packing has fewer bytes: each input's row as a bitmask (unstructured zeros; 12
    outputs, too few for a window of 16), or as windows of 16 columns (16x1 blocks)."""
    rng = np.random.default_rng(4)
    if layout == "bitmask rows":
        n, w = 12, _weight(rng, 32, 12, sparsity=0.7)
        packed, dual = pack_dual_weight(w), 1
    else:
        n, w = 32, _weight(rng, 32, 32)
        w[:, 16:] *= rng.random((32, 1)) < 0.3  # 16x1 blocks of W^T: an input's 16 outputs
        w[:, :16] *= rng.random((32, 1)) < 0.3
        packed, dual = pack_segment_weight(w), 2
    t = np.array([0.5], np.float32)
    arrays = {"t": t, **dict(zip(("w_bits", "w_offsets", "w_values"), formats.get("bitmask").encode(w)))}
    lifted = [(array, f"w_values:dual{i}") for i, array in enumerate(packed)]
    return Case(_before(f"""
        <ir_version: 10, opset_import: ["" : 18, {SPARSE}]>
        gated (float[1, 32] x) => (float[1, {n}] y) <{_declare(arrays)}> {{
            [lin] y = ai.sparsecc.GatedMatMul:threshold_bitmask <shape: ints = [32, {n}]> (x, t, w_bits, w_offsets, w_values)
        }}""", arrays), f"""
        <ir_version: 10, opset_import: ["" : 18, {SPARSE}, {CPU}]>
        gated (float[1, 32] x, {_declare({f"weight{i}": a for i, (a, _) in enumerate(lifted)})}) => (float[1, {n}] y) <float[1] t> {{
            [lin] y = ai.sparsecc.cpu.CpuGatedMatMul <dual: int = {dual}, k: int = 32, n: int = {n}> (x, t, weight0, weight1, weight2)
        }}""", lifted, f"cpu: lin [32x{n}] -> dual-sparse kernel over {layout}", _x(rng, 1))


def _ids(rng, rows: int) -> dict[str, np.ndarray]:
    return {"ids": rng.integers(0, 64, (1, rows)).astype(np.int64)}


def tied_dense() -> Case:
    """An output projection that reads the embedding table through a Transpose: the
    lookup reads the rows from the projection's panels, and the table is stored once."""
    rng = np.random.default_rng(5)
    table = _weight(rng, 64, 32)
    panel = pack_dense_weight(np.ascontiguousarray(table.T))
    return Case(_before("""
        <ir_version: 10, opset_import: ["" : 18]>
        tied (int64[1, 4] ids) => (float[1, 4, 64] logits) <float[64, 32] table> {
            [embed] h = Gather (table, ids)
            [project_t] table_t = Transpose <perm: ints = [1, 0]> (table)
            [project] logits = MatMul (h, table_t)
        }""", {"table": table}), f"""
        <ir_version: 10, opset_import: ["" : 18, {CPU}]>
        tied (int64[1, 4] ids, {_shape(panel)} weight0) => (float[1, 4, 64] logits) {{
            [embed] h = ai.sparsecc.cpu.PackedGather <k: int = 32, n: int = 64> (weight0, ids)
            [project_panel] logits = ai.sparsecc.cpu.PanelMatMul <k: int = 32, n: int = 64> (h, weight0)
        }}""", [(panel, "table")], "cpu: embed reads the embedding rows from the stored tied output projection (weight0)",
        _ids(rng, 4))


def tied_sparse() -> Case:
    """A csr output projection W = E^T pruned with its table E: the lookup reads E's rows
    from the csr arrays, which then serve the projection at every row count (16 here)."""
    rng = np.random.default_rng(6)
    table = _weight(rng, 64, 32, sparsity=0.8)
    arrays = dict(zip(("w_indptr", "w_indices", "w_values"), formats.get("csr").encode(np.ascontiguousarray(table.T))))
    lifted = [(array, f"w_values:{part}") for array, part in zip(arrays.values(), "abc")]
    return Case(_before(f"""
        <ir_version: 10, opset_import: ["" : 18, {SPARSE}]>
        tied (int64[1, 16] ids) => (float[1, 16, 64] logits) <float[64, 32] table, {_declare(arrays)}> {{
            [embed] h = Gather (table, ids)
            [project] logits = ai.sparsecc.SparseMatMul:csr <shape: ints = [32, 64]> (h, w_indptr, w_indices, w_values)
        }}""", {"table": table, **arrays}), f"""
        <ir_version: 10, opset_import: ["" : 18, {SPARSE}, {CPU}]>
        tied (int64[1, 16] ids, {_declare({f"weight{i}": a for i, (a, _) in enumerate(lifted)})}) => (float[1, 16, 64] logits) {{
            [embed] h = ai.sparsecc.cpu.SparseGather <format: string = "csr", k: int = 32, n: int = 64> (ids, weight0, weight1, weight2)
            [project] logits = ai.sparsecc.cpu.CpuSparseMatMul <format: string = "csr", k: int = 32, n: int = 64> (h, weight0, weight1, weight2)
        }}""", lifted, "csr sparse kernel at every row count (tied to the embedding table", _ids(rng, 16))


CASES = {
    "dense MatMul": dense_matmul,
    "Gemm with bias": gemm_with_bias,
    "SparseMatMul, 1 row": lambda: sparse_matmul(1),
    "SparseMatMul, 16 rows": lambda: sparse_matmul(16),
    "SparseMatMul, all zero": lambda: sparse_matmul(1, sparsity=1.0),
    "GatedMatMul dense, 1 row": lambda: gated_dense(1),
    "GatedMatMul dense, 16 rows": lambda: gated_dense(16),
    "GatedMatMul bitmask rows": lambda: gated_sparse("bitmask rows"),
    "GatedMatMul windows": lambda: gated_sparse("windows of 16 columns"),
    "tied dense": tied_dense,
    "tied sparse": tied_sparse,
}


def _text(model: onnx.ModelProto) -> str:
    """The model as ONNX text without initializers, value_info and functions (compared
    separately or not produced)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for repeated in (copy.graph.initializer, copy.graph.value_info, copy.functions):
        del repeated[:]
    return onnx.printer.to_text(copy)


def assert_legalizes_to(model: onnx.ModelProto, expected: str) -> tuple[list, list[str]]:
    """Legalizes a copy of ``model`` and compares it with ``expected``; returns the lifted
    weights and the explanations."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    legalized, weights, explanations = legalize(copy, BACKEND)
    expected_model = onnx.parser.parse_model(expected)
    assert _text(legalized) == _text(expected_model)
    assert ({init.name: list(init.dims) for init in legalized.graph.initializer}
            == {value.name: [d.dim_value for d in value.type.tensor_type.shape.dim] for value in expected_model.graph.value_info})
    return weights, explanations


@pytest.mark.parametrize("name", CASES)
def test_structure(name):
    case = CASES[name]()
    weights, explanations = assert_legalizes_to(case.before, case.expected)
    assert [(input_name, source) for input_name, _, source in weights] == [
        (f"weight{i}", source) for i, (_, source) in enumerate(case.lifted)]
    for (_, array, _), (expected, _) in zip(weights, case.lifted):
        assert array.dtype == expected.dtype
        np.testing.assert_array_equal(array, expected)
    assert any(case.explained in line for line in explanations), explanations


@pytest.mark.parametrize("name", CASES)
def test_compiled_matches_onnxruntime_on_the_before(name, tmp_path):
    from compiler.driver import CompileOptions, compile_model

    case = CASES[name]()
    onnx.save(case.before, tmp_path / "before.onnx")
    summary = compile_model(CompileOptions(str(tmp_path / "before.onnx"), str(tmp_path / "b.sccx"), explain=True))
    assert any(case.explained in line for line in summary["explanations"]), summary["explanations"]
    reference = onnxruntime_reference(case.before, case.feeds)
    ours = runtime.load(tmp_path / "b.sccx").run(case.feeds)
    for output, expected in zip(case.before.graph.output, reference):
        np.testing.assert_allclose(ours[output.name], expected, rtol=RELATIVE_TOLERANCE, atol=ABSOLUTE_TOLERANCE)


def test_refused_gemm_stays_a_tvm_matmul_with_its_reason():
    """alpha = 2 is not ``x @ W + C``: the Gemm is left as it is, and the legalized graph
    (standard ops only) gives exactly the Before's result in onnxruntime."""
    rng = np.random.default_rng(7)
    before = _before("""
        <ir_version: 10, opset_import: ["" : 18]>
        linear (float[2, 32] x) => (float[2, 24] y) <float[32, 24] w> {
            [lin] y = Gemm <alpha: float = 2.0> (x, w)
        }""", {"w": _weight(rng, 32, 24)})
    weights, explanations = assert_legalizes_to(before, f"""
        <ir_version: 10, opset_import: ["" : 18, {CPU}]>
        linear (float[2, 32] x) => (float[2, 24] y) <float[32, 24] w> {{
            [lin] y = Gemm <alpha: float = 2.0> (x, w)
        }}""")
    assert weights == [] and "cpu: lin stays a TVM matmul: alpha or beta is not 1." in explanations
    copy = onnx.ModelProto()
    copy.CopyFrom(before)
    legalized = legalize(copy, BACKEND)[0]
    feeds = _x(rng, 2)
    np.testing.assert_array_equal(onnxruntime_reference(legalized, feeds)[0], onnxruntime_reference(before, feeds)[0])


def test_large_constant_is_lifted_with_a_reason():
    """A float constant of LIFT_MIN_BYTES (here 128 x 128 x 4 bytes) that no kernel reads
    leaves the library as a graph input; fed its value, the legalized graph is the Before."""
    rng = np.random.default_rng(8)
    offset = rng.standard_normal((128, 128)).astype(np.float32)
    before = _before("""
        <ir_version: 10, opset_import: ["" : 18]>
        shift (float[128, 128] x) => (float[128, 128] y) <float[128, 128] offset> {
            [add] y = Add (x, offset)
        }""", {"offset": offset})
    weights, explanations = assert_legalizes_to(before, f"""
        <ir_version: 10, opset_import: ["" : 18, {CPU}]>
        shift (float[128, 128] x, float[128, 128] weight0) => (float[128, 128] y) {{
            [add] y = Add (x, weight0)
        }}""")
    assert [(name, source) for name, _, source in weights] == [("weight0", "offset")]
    np.testing.assert_array_equal(weights[0][1], offset)
    assert any("constant offset [128, 128] (65536 bytes) -> graph input weight0" in line for line in explanations)
    copy = onnx.ModelProto()
    copy.CopyFrom(before)
    legalized = legalize(copy, BACKEND)[0]
    x = rng.standard_normal((128, 128)).astype(np.float32)
    np.testing.assert_array_equal(onnxruntime_reference(legalized, {"x": x, "weight0": offset})[0],
                                  onnxruntime_reference(before, {"x": x})[0])


def test_legalize_is_the_pipelines_last_phase():
    """The phase hands on the lifted weights, the sparsity report of the graph it received
    and, for its dump, a self-contained model."""
    from compiler.pipeline import LEGALIZE, Legalized, onnx_phases
    from targets import get_target

    phases = onnx_phases({"x": [1, 32]}, get_target("cpu"))
    assert phases[-1].name == LEGALIZE
    case = dense_matmul()
    result = phases[-1].run(case.before)
    assert isinstance(result, Legalized) and result.modified
    assert [layer.shape for layer in result.report.layers] == [(32, 24)]
    assert [name for name, _, _ in result.weights] == ["weight0"]
    dumped = result.self_contained()
    np.testing.assert_array_equal(numpy_helper.to_array(dumped.graph.initializer[0]), case.lifted[0][0])
    assert not result.model.graph.initializer
