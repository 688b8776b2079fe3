import numpy as np
import onnx.parser
import pytest
from hypothesis import given, settings, strategies as st
from onnx import numpy_helper

from passes.analyze_sparsity import analyze_sparsity
import formats
from passes.sparse_formats import block_structure, choose_format, nonzero_blocks

TWO_LAYERS = """
<ir_version: 8, opset_import: ["" : 18]>
two (float[1, 64] x) => (float[1, 16] y) <float[64, 32] w1, float[16, 32] w2> {
    h = MatMul(x, w1)
    y = Gemm<transB: int = 1>(h, w2)
}
"""


def _model(w1, w2):
    model = onnx.parser.parse_model(TWO_LAYERS)
    del model.graph.initializer[:]
    model.graph.initializer.extend([numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    return model


def test_reports_shape_sparsity_block_and_bytes():
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((64, 32)).astype(np.float32)
    w1[rng.random((64, 32)) < 0.75] = 0.0  # unstructured 75 %
    # w2 is [N=16, K=32] as Gemm's transposed B; zero whole 1x16 blocks along K.
    w2 = rng.standard_normal((16, 32)).astype(np.float32)
    w2[:, 16:] = 0.0
    report = analyze_sparsity(_model(w1, w2))
    first, second = report.layers
    assert first.shape == (64, 32) and second.shape == (32, 16)
    assert first.sparsity == pytest.approx(float((w1 == 0).mean()))
    assert first.block == "none"
    assert second.sparsity == pytest.approx(0.5)
    assert second.block == "16x16"
    assert first.dense_bytes == 64 * 32 * 4
    # 75 % unstructured: CSR with int16 indices beats dense; a bitmask beats CSR.
    assert first.best_bytes < first.dense_bytes
    assert report.dense_bytes == first.dense_bytes + second.dense_bytes
    assert report.to_dict()["totals"]["layers"] == 2


def test_dense_weight_stays_dense():
    rng = np.random.default_rng(1)
    choice = choose_format(rng.standard_normal((32, 32)).astype(np.float32) + 10)
    assert choice.format == "dense" and choice.bytes == formats.get("dense").bytes_read(32, 32, 32 * 32) == 32 * 32 * 4


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 8), st.integers(1, 8), st.sampled_from([(1, 4), (4, 1), (2, 2), (4, 4)]), st.floats(0, 1))
def test_nonzero_blocks_matches_brute_force(row_tiles, col_tiles, block, density):
    rng = np.random.default_rng(row_tiles * 31 + col_tiles)
    rows, cols = block
    weight_t = rng.standard_normal((row_tiles * rows, col_tiles * cols)).astype(np.float32)
    weight_t[rng.random(weight_t.shape) > density] = 0.0
    expected = sum(
        bool(weight_t[r * rows:(r + 1) * rows, c * cols:(c + 1) * cols].any())
        for r in range(row_tiles) for c in range(col_tiles)
    )
    assert nonzero_blocks(weight_t, block) == expected


def test_block_structure_found_only_when_zeros_are_blocked():
    rng = np.random.default_rng(2)
    blocked = np.repeat(rng.random((8, 16)) < 0.5, 4, axis=0).astype(np.float32)  # 4x1 blocks
    assert block_structure(blocked)[0] == (4, 1)
    scattered = (rng.random((32, 16)) < 0.5).astype(np.float32)
    assert block_structure(scattered)[0] is None


def test_csr_uses_int16_indices_below_32768():
    csr = formats.get("csr")
    assert csr.bytes_read(1000, 10, 100) == 100 * 6 + 11 * 4
    assert csr.bytes_read(40000, 10, 100) == 100 * 8 + 11 * 4
