"""The sparse CPU kernels against numpy: ``x @ decode(encode(W))``, ``gate(x) @ W`` or ``W^T[ids]``.

Shapes are small and deliberately awkward: sizes that are not multiples of the 16-lane
vector or of the block, rows with no nonzero (``W[:, 0] = 0`` in every weight), all-zero
and fully dense weights, activation sparsity 0 % and 100 %, and batches of 1, 3, 8 and 9
(9 is more than one row tile). Every function is compiled once per shape and cached.

Tolerance: ``rtol = atol = 1e-5`` against a float64 reference. The kernels sum in fp32
and in another order than numpy (16 lanes, then a tree), so results differ in the last
bits; with ``W`` scaled by ``1/sqrt(K)`` the outputs are O(1) and the reordering error of
a K <= 100 sum is a few 1e-7, well inside the tolerance, while any real indexing or
masking bug moves an output by O(0.1).
"""

from __future__ import annotations

import os

os.environ.setdefault("TVM_NUM_THREADS", str(os.cpu_count() or 1))

import numpy as np
import pytest

from passes.sparse_formats import BLOCK_SHAPES, decode, encode
from targets.cpu import sparse_kernels as sk

RTOL = 1e-5
ATOL = 1e-5

_compiled: dict = {}


def _kernel(builder, *args, **kwargs):
    """``builder(*args, **kwargs)`` compiled for the host, cached by its arguments."""
    import tvm

    from targets.cpu.host import host_target

    key = (builder.__name__, args, tuple(sorted(kwargs.items())))
    if key not in _compiled:
        func = builder(*args, **kwargs)
        symbol = str(func.attrs["global_symbol"])
        _compiled[key] = tvm.compile(tvm.IRModule({symbol: func}), target=host_target()).mod[
            symbol
        ]
    return _compiled[key]


def _run(kernel, inputs, out_shape) -> np.ndarray:
    import tvm

    y = tvm.runtime.tensor(np.full(out_shape, np.nan, np.float32))
    kernel(*[tvm.runtime.tensor(np.ascontiguousarray(a)) for a in inputs], y)
    return y.numpy()


def _weight(k, n, sparsity, seed, block=None):
    """A [k, n] weight with about ``sparsity`` zeros (in (R, C) blocks of W^T if given),
    and always one all-zero output row of W^T (column 0 of W)."""
    rng = np.random.default_rng(seed)
    weight = (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)
    if block is None:
        weight[rng.random((k, n)) < sparsity] = 0
    else:
        r, c = block
        keep = rng.random((-(-k // c), -(-n // r))) >= sparsity
        weight *= np.repeat(np.repeat(keep, c, 0), r, 1)[:k, :n]
    weight[:, 0] = 0
    return weight


def _x(m, k, seed):
    return np.random.default_rng(seed + 1).standard_normal((m, k)).astype(np.float32)


def _reference(x, weight):
    return x.astype(np.float64) @ weight.astype(np.float64)


# --- CSR -------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "m,k,n,sparsity",
    [
        (1, 37, 29, 0.0),
        (1, 37, 29, 0.5),
        (1, 37, 29, 0.9),
        (1, 37, 29, 1.0),  # all-zero weight: nnz = 0
        (3, 64, 48, 0.5),
        (8, 100, 33, 0.0),  # rows of 100: six full vectors and a masked tail
        (8, 100, 33, 0.9),
        (9, 20, 17, 0.5),
    ],
)
def test_csr_matches_numpy(m, k, n, sparsity):
    weight = _weight(k, n, sparsity, seed=m * k + n)
    x = _x(m, k, seed=k)
    arrays = encode(weight, "csr")
    np.testing.assert_array_equal(decode(arrays, "csr", (k, n)), weight)
    kernel = _kernel(sk.csr_matmul_func, m, k, n, arrays[2].size, str(arrays[1].dtype))
    np.testing.assert_allclose(_run(kernel, [x, *arrays], (m, n)), _reference(x, weight), RTOL, ATOL)


def test_csr_int32_indices():
    m, k, n = 3, 50, 40
    weight = _weight(k, n, 0.6, seed=3)
    x = _x(m, k, seed=3)
    indptr, indices, values = encode(weight, "csr")
    kernel = _kernel(sk.csr_matmul_func, m, k, n, values.size, "int32")
    got = _run(kernel, [x, indptr, indices.astype(np.int32), values], (m, n))
    np.testing.assert_allclose(got, _reference(x, weight), RTOL, ATOL)


# --- BSR -------------------------------------------------------------------------------

BSR_CASES = [
    (1, 37, 29, 0.5, False),  # unstructured zeros: partly filled blocks
    (8, 40, 35, 0.7, True),  # whole zero blocks; k, n not multiples of 16
]


@pytest.mark.parametrize(
    "block,m,k,n,sparsity,structured",
    [(block, *case) for block in BLOCK_SHAPES for case in BSR_CASES]
    + [((4, 4), 3, 48, 32, 0.0, True), ((16, 16), 3, 48, 32, 0.0, True)],  # dense: all blocks
)
def test_bsr_matches_numpy(block, m, k, n, sparsity, structured):
    weight = _weight(k, n, sparsity, seed=k + n + block[0], block=block if structured else None)
    x = _x(m, k, seed=n)
    arrays = encode(weight, "bsr", block)
    np.testing.assert_array_equal(decode(arrays, "bsr", (k, n), block), weight)
    kernel = _kernel(
        sk.bsr_matmul_func, m, k, n, block, arrays[2].shape[0], str(arrays[1].dtype)
    )
    np.testing.assert_allclose(_run(kernel, [x, *arrays], (m, n)), _reference(x, weight), RTOL, ATOL)


@pytest.mark.parametrize("block,m", [((4, 4), 1), ((16, 16), 9), ((1, 16), 9), ((16, 1), 1)])
def test_bsr_all_zero_weight(block, m):
    k, n = 21, 19
    weight = np.zeros((k, n), np.float32)
    arrays = encode(weight, "bsr", block)
    assert arrays[2].shape[0] == 0
    kernel = _kernel(sk.bsr_matmul_func, m, k, n, block, 0, str(arrays[1].dtype))
    np.testing.assert_array_equal(_run(kernel, [_x(m, k, 0), *arrays], (m, n)), 0)


def test_bsr_int32_indices():
    m, k, n, block = 2, 40, 24, (4, 4)
    weight = _weight(k, n, 0.5, seed=5, block=block)
    x = _x(m, k, seed=5)
    indptr, indices, values = encode(weight, "bsr", block)
    kernel = _kernel(sk.bsr_matmul_func, m, k, n, block, values.shape[0], "int32")
    got = _run(kernel, [x, indptr, indices.astype(np.int32), values], (m, n))
    np.testing.assert_allclose(got, _reference(x, weight), RTOL, ATOL)


# --- Bitmask ---------------------------------------------------------------------------

@pytest.mark.parametrize(
    "m,k,n,sparsity",
    [
        (1, 37, 29, 0.0),  # two chunks of 16 and a 5-column tail
        (1, 37, 29, 0.5),
        (1, 37, 29, 1.0),
        (3, 64, 48, 0.5),  # whole chunks only
        (8, 100, 33, 0.5),  # six chunks (one group of four and two more), 4-column tail
        (1, 8, 3, 0.5),  # a tail only, of one byte
        (9, 20, 10, 0.0),  # more rows than a tile
        (3, 48, 5, 0.9),
        (1, 5, 7, 0.5),
    ],
)
def test_bitmask_matches_numpy(m, k, n, sparsity):
    weight = _weight(k, n, sparsity, seed=m + k + n)
    x = _x(m, k, seed=n)
    arrays = encode(weight, "bitmask")
    np.testing.assert_array_equal(decode(arrays, "bitmask", (k, n)), weight)
    kernel = _kernel(sk.bitmask_matmul_func, m, k, n, arrays[2].size)
    np.testing.assert_allclose(_run(kernel, [x, *arrays], (m, n)), _reference(x, weight), RTOL, ATOL)


# --- Gated and dual --------------------------------------------------------------------

def _threshold(x, activation_sparsity, per_channel, seed):
    """A threshold giving about ``activation_sparsity`` gated-off inputs (exactly 0 % / 100 %)."""
    k = x.shape[1]
    if activation_sparsity == 0.0:
        value = -1.0  # |x| > -1 everywhere
    elif activation_sparsity == 1.0:
        value = float(np.abs(x).max()) + 1.0
    else:
        value = float(np.quantile(np.abs(x), activation_sparsity))
    if not per_channel:
        return np.array([value], np.float32)
    # Per channel: the same target level, jittered, so channels differ.
    jitter = np.random.default_rng(seed).uniform(0.8, 1.2, k)
    return (value * jitter if 0 < activation_sparsity < 1 else np.full(k, value)).astype(np.float32)


def _gate(x, threshold):
    return np.where(np.abs(x) > threshold, x, 0).astype(np.float32)


GATE_CASES = [
    # m, k, n, activation sparsity, per_channel
    (1, 37, 29, 0.5, False),
    (1, 64, 48, 0.7, True),
    (3, 40, 35, 0.5, True),
    (8, 100, 33, 0.4, False),
    (9, 20, 17, 0.5, False),
    (1, 5, 70, 0.5, True),  # fewer inputs than parallel tasks
    (3, 30, 1100, 0.5, False),  # long rows: the in-row prefetch split
    (1, 37, 29, 0.0, False),
    (3, 37, 29, 0.0, True),
    (1, 37, 29, 1.0, False),
    (8, 37, 29, 1.0, True),
]


@pytest.mark.parametrize("m,k,n,activation_sparsity,per_channel", GATE_CASES)
def test_gated_matches_numpy(m, k, n, activation_sparsity, per_channel):
    weight = _weight(k, n, 0.0, seed=k + n)
    x = _x(m, k, seed=k)
    threshold = _threshold(x, activation_sparsity, per_channel, seed=n)
    kernel = _kernel(sk.gated_matmul_func, m, k, n, per_channel)
    got = _run(kernel, [x, threshold, weight], (m, n))
    np.testing.assert_allclose(got, _reference(_gate(x, threshold), weight), RTOL, ATOL)


def test_gated_skips_a_row_only_when_every_batch_row_is_gated():
    m, k, n = 3, 24, 20
    weight = _weight(k, n, 0.0, seed=1)
    x = np.full((m, k), 0.01, np.float32)
    x[2, 5] = 2.0  # input 5 is active in one row only
    threshold = np.array([0.5], np.float32)
    kernel = _kernel(sk.gated_matmul_func, m, k, n, False)
    got = _run(kernel, [x, threshold, weight], (m, n))
    expected = np.zeros((m, n))
    expected[2] = 2.0 * weight[5]
    np.testing.assert_allclose(got, expected, RTOL, ATOL)


# Each gate case once, its weight 50 % sparse, dense or all zero in turn.
DUAL_CASES = [(*case, (0.5, 0.0, 1.0)[i % 3]) for i, case in enumerate(GATE_CASES)] + [
    (1, 64, 48, 0.0, False, 0.9),
    (3, 40, 35, 0.5, True, 1.0),
]


@pytest.mark.parametrize("m,k,n,activation_sparsity,per_channel,weight_sparsity", DUAL_CASES)
def test_dual_matches_numpy(m, k, n, activation_sparsity, per_channel, weight_sparsity):
    weight = _weight(k, n, weight_sparsity, seed=k * n)
    x = _x(m, k, seed=n)
    threshold = _threshold(x, activation_sparsity, per_channel, seed=k)
    arrays = sk.pack_dual_weight(weight)
    np.testing.assert_array_equal(sk.unpack_dual_weight(arrays, k, n), weight)
    kernel = _kernel(sk.dual_matmul_func, m, k, n, arrays[2].size, per_channel)
    got = _run(kernel, [x, threshold, *arrays], (m, n))
    np.testing.assert_allclose(got, _reference(_gate(x, threshold), weight), RTOL, ATOL)


# --- Row gathers (the embedding lookup of a sparse tied table) ---------------------------

@pytest.mark.parametrize("format", ["csr", "bitmask"])
@pytest.mark.parametrize(
    "k,n,sparsity,id_dtype",
    [
        (37, 29, 0.9, "int64"),  # rows of 37: not whole bytes of bits, not whole vectors
        (64, 50, 0.5, "int32"),
        (20, 17, 0.0, "int64"),
        (20, 17, 1.0, "int64"),  # all-zero table: nnz = 0
    ],
)
def test_gathers_return_rows_of_the_table_exactly(format, k, n, sparsity, id_dtype):
    """``y = W^T[ids]``, bit for bit (a gather only copies), for ids that repeat and that
    name the empty row 0 and the last row."""
    weight = _weight(k, n, sparsity, seed=k + n)
    ids = np.array([0, n - 1, 3, 0, 3, 1, n // 2], id_dtype)
    arrays = encode(weight, format)
    if format == "csr":
        kernel = _kernel(sk.csr_gather_func, ids.size, k, n, arrays[2].size, str(arrays[1].dtype), id_dtype)
    else:
        kernel = _kernel(sk.bitmask_gather_func, ids.size, k, n, arrays[2].size, id_dtype)
    np.testing.assert_array_equal(_run(kernel, [ids, *arrays], (ids.size, k)), weight.T[ids])


def test_csr_gather_int32_indices():
    k, n = 50, 40
    weight = _weight(k, n, 0.6, seed=5)
    indptr, indices, values = encode(weight, "csr")
    ids = np.arange(n, dtype=np.int64)[::-3].copy()
    kernel = _kernel(sk.csr_gather_func, ids.size, k, n, values.size, "int32")
    got = _run(kernel, [ids, indptr, indices.astype(np.int32), values], (ids.size, k))
    np.testing.assert_array_equal(got, weight.T[ids])
def _block_weight(k, n, sparsity, seed):
    """A [k, n] weight pruned in runs of 16 columns of one row (16x1 blocks of W^T), the
    runs unaligned (a few columns deleted, as drop_dead_neurons does), row 0 all zero."""
    rng = np.random.default_rng(seed)
    wide = n + 3
    keep = rng.random((k, -(-wide // 16))) >= sparsity
    weight = (rng.standard_normal((k, wide)) / np.sqrt(k)).astype(np.float32) * np.repeat(keep, 16, axis=1)[:, :wide]
    weight[0] = 0
    return np.ascontiguousarray(np.delete(weight, rng.choice(wide, 3, replace=False), axis=1))


# Gate cases with n >= 16, block-pruned at 70 % (and dense, and at 95 %); then 50 %
# unstructured, whose windows overlap at the ends of rows.
SEGMENT_CASES = [(*case, (0.7, 0.0, 0.95)[i % 3], "block") for i, case in enumerate(GATE_CASES) if case[2] >= 16] + [
    (1, 64, 48, 0.5, False, 0.5, "unstructured"),
    (3, 30, 1100, 0.5, True, 0.5, "unstructured"),
]


@pytest.mark.parametrize("m,k,n,activation_sparsity,per_channel,weight_sparsity,pattern", SEGMENT_CASES)
def test_segment_dual_matches_numpy(m, k, n, activation_sparsity, per_channel, weight_sparsity, pattern):
    weight = (_block_weight(k, n, weight_sparsity, seed=k + n) if pattern == "block"
              else _weight(k, n, weight_sparsity, seed=k * n))
    x = _x(m, k, seed=n)
    threshold = _threshold(x, activation_sparsity, per_channel, seed=k)
    arrays = sk.pack_segment_weight(weight)
    np.testing.assert_array_equal(sk.unpack_segment_weight(arrays, k, n), weight)
    kernel = _kernel(sk.segment_matmul_func, m, k, n, arrays[1].size, per_channel)
    got = _run(kernel, [x, threshold, *arrays], (m, n))
    np.testing.assert_allclose(got, _reference(_gate(x, threshold), weight), RTOL, ATOL)


def test_segments_are_one_window_per_aligned_block_and_smaller_than_bitmask_rows():
    k, n = 64, 96
    keep = np.random.default_rng(0).random((k, n // 16)) >= 0.7
    weight = np.random.default_rng(1).standard_normal((k, n)).astype(np.float32) * np.repeat(keep, 16, axis=1)
    offsets, starts, values = arrays = sk.pack_segment_weight(weight)
    assert starts.size == keep.sum() and np.all(starts % 16 == 0) and values.size == (weight != 0).sum()
    assert sum(a.nbytes for a in arrays) < sum(a.nbytes for a in sk.pack_dual_weight(weight))


# --- Argument checks -------------------------------------------------------------------

@pytest.mark.parametrize(
    "builder,args",
    [
        (sk.csr_matmul_func, (0, 4, 4, 1)),
        (sk.csr_matmul_func, (1, 4, 4, -1)),
        (sk.csr_matmul_func, (1, 4, 4, 1, "int8")),
        (sk.csr_matmul_func, (1, 40000, 4, 1, "int16")),
        (sk.bsr_matmul_func, (1, 4, 0, (4, 4), 1)),
        (sk.bsr_matmul_func, (1, 4, 4, (3, 1), 1)),
        (sk.bsr_matmul_func, (1, 4, 4, (32, 1), 1)),
        (sk.bitmask_matmul_func, (1, -2, 4, 1)),
        (sk.bitmask_matmul_func, (1, 2, 4, -1)),
        (sk.gated_matmul_func, (1, 4, 0, False)),
        (sk.gated_matmul_func, (1, 4, 4, "yes")),
        (sk.gated_matmul_func, (1, 4, 4, False, 0)),
        (sk.dual_matmul_func, (2, 0, 4, 1, True)),
        (sk.dual_matmul_func, (2, 4, 4, -3, True)),
        (sk.csr_gather_func, (0, 4, 4, 1)),
        (sk.csr_gather_func, (1, 4, 4, 1, "int8")),
        (sk.csr_gather_func, (1, 4, 4, 1, "int16", "float32")),
        (sk.bitmask_gather_func, (1, 4, 4, -1)),
        (sk.bitmask_gather_func, (1, 4, 4, 1, "uint8")),
        (sk.segment_matmul_func, (1, 4, 15, 1, False)),
        (sk.segment_matmul_func, (1, 4, 16, -1, False)),
    ],
)
def test_bad_sizes_raise(builder, args):
    with pytest.raises(ValueError):
        builder(*args)


def test_pack_dual_weight_rejects_non_float32():
    with pytest.raises(ValueError):
        sk.pack_dual_weight(np.zeros((3, 4), np.float64))
