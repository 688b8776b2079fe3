"""Format round trips: dense -> format -> dense is exact and keeps every nonzero."""

import numpy as np
from hypothesis import given, settings, strategies as st

from passes.sparse_formats import bitmask_bytes, csr_bytes, decode, encode


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
    assert sum(a.nbytes for a in encode(weight, "csr")) == csr_bytes(300, 70, nnz)
    assert sum(a.nbytes for a in encode(weight, "bitmask")) == bitmask_bytes(300, 70, nnz)
