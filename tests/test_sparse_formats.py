"""The cost model and its thin encode / decode: round trips through the ai.sparsecc
formats are exact, sizes are the bytes the model counts, and each target's choice is
among the formats its kernels take."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import formats
from passes.sparse_formats import KernelCosts, decide, decide_gated, decode, encode
from targets.cpu.legalize import COSTS as CPU_COSTS
from targets.cuda.legalize import COSTS as CUDA_COSTS


@st.composite
def sparse_weights(draw):
    k = draw(st.integers(1, 40))
    n = draw(st.integers(1, 40))
    sparsity = draw(st.sampled_from([0.0, 0.5, 0.7, 0.9, 1.0]))
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    weight = rng.standard_normal((k, n)).astype(np.float32)
    weight[rng.random((k, n)) < sparsity] = 0.0
    if draw(st.booleans()) and n > 1:
        weight[:, 0] = 0.0  # an all-zero output row of W^T
    return weight


@settings(max_examples=60, deadline=None)
@given(sparse_weights(), st.sampled_from(["dense", "csr", "bitmask", "bsr1x4", "bsr4x1", "bsr4x4", "bsr16x1"]))
def test_round_trip_is_exact(weight, name):
    format, block = (name, None) if not name.startswith("bsr") else ("bsr", tuple(int(v) for v in name[3:].split("x")))
    arrays = encode(weight, format, block)
    again = decode(arrays, format, weight.shape, block)
    np.testing.assert_array_equal(again, weight)
    assert np.count_nonzero(again) == np.count_nonzero(weight)
    if format in ("csr", "bitmask"):
        assert arrays[-1].size == np.count_nonzero(weight)


def test_encoded_sizes_match_the_cost_model():
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((300, 70)).astype(np.float32)
    weight[rng.random(weight.shape) < 0.7] = 0
    nnz = np.count_nonzero(weight)
    assert sum(a.nbytes for a in encode(weight, "csr")) == formats.get("csr").bytes_read(300, 70, nnz) == nnz * 6 + 71 * 4
    assert sum(a.nbytes for a in encode(weight, "bitmask")) == formats.get("bitmask").bytes_read(300, 70, nnz) \
        == 70 * 38 + nnz * 4 + 71 * 4


def _unstructured(sparsity, k=512, n=256, seed=0):
    rng = np.random.default_rng(seed)
    weight = rng.standard_normal((k, n)).astype(np.float32)
    weight[rng.random((k, n)) < sparsity] = 0
    return weight


def test_each_target_chooses_among_the_formats_its_kernels_take():
    """At 70 % unstructured zeros the bitmask reads fewest bytes (1.325 per weight against
    csr's 1.8) and the CPU takes it (3.02 x 0.75 = 2.26x over csr's 2.22 x 0.9 = 2.0x);
    the cuda target has no bitmask kernel and takes csr, at its own efficiency."""
    weight = _unstructured(0.7)
    cpu, cuda = decide(weight, CPU_COSTS), decide(weight, CUDA_COSTS)
    assert (cpu.format, cuda.format) == ("bitmask", "csr")
    assert "bitmask" not in cuda.candidates and "cpu kernel costs" in cpu.reason and "cuda kernel costs" in cuda.reason
    k, n = weight.shape
    nnz = np.count_nonzero(weight)
    assert cuda.predicted_speedup == 4 * k * n / formats.get("csr").bytes_read(k, n, nnz) * CUDA_COSTS.efficiency["csr"]


def test_gated_choice_reads_the_bytes_of_the_targets_dual_layout():
    """Behind a gate the CPU compares its bitmask rows (N / 8 bytes of bits per row), the
    cuda target its 32-column words (8 bytes of bits and offset per word, N / 4 a row)."""
    weight = _unstructured(0.5)
    k, n = weight.shape
    nnz = np.count_nonzero(weight)
    for costs, rows_bytes in ((CPU_COSTS, k * n // 8 + 4 * (k + 1)), (CUDA_COSTS, k * n // 4)):
        decision = decide_gated(weight, costs)
        assert decision.format == "bitmask"
        assert decision.predicted_speedup == 4 * k * n / (rows_bytes + 4 * nnz) * costs.gated_efficiency
        assert f"{costs.target} kernel costs" in decision.reason


def test_costs_refuse_a_format_the_target_has_no_kernel_for():
    with pytest.raises(ValueError, match="no sparse kernel for bitmask"):
        KernelCosts("cuda", {"dense": 1.0, "bitmask": 0.9}, "bitmask_words", 0.9, "test")
    with pytest.raises(ValueError, match="no gated kernel for bitmask_rows"):
        KernelCosts("cuda", {"dense": 1.0}, "bitmask_rows", 0.9, "test")
    with pytest.raises(ValueError, match="unknown format 'coo'; choose one of dense, csr"):
        KernelCosts("cpu", {"dense": 1.0, "coo": 0.9}, "bitmask_rows", 0.9, "test")
