"""formats/: every format's description holds together.

Round trips dense -> format -> dense are exact and keep every nonzero; ``encode`` gives
the arrays ``layout`` names; ``bytes_read`` is the arrays' real size (and, for the formats
whose rows a gated kernel skips, the size of the active rows' arrays); kernel symbols
parse back into the facts they were built from, and are the global symbols the kernels
of both targets really carry.
"""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest
from hypothesis import assume, given, settings, strategies as st

import formats
from formats import FORMATS, KernelFacts
from passes.sparse_formats import BLOCK_SHAPES

ROOT = Path(__file__).resolve().parent.parent


@st.composite
def weights(draw):
    """A [K, N] float32 weight with a drawn fraction of zeros, sometimes in whole 16x1
    blocks of W^T, sometimes with an all-zero row and column."""
    k = draw(st.integers(1, 40))
    n = draw(st.integers(1, 48))
    sparsity = draw(st.sampled_from([0.0, 0.5, 0.7, 0.9, 1.0]))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    weight = rng.standard_normal((k, n)).astype(np.float32)
    if draw(st.booleans()):
        weight[rng.random((k, n)) < sparsity] = 0.0
    else:
        keep = rng.random((k, -(-n // 16))) >= sparsity
        weight *= np.repeat(keep, 16, axis=1)[:, :n]
    if draw(st.booleans()):
        weight[:, 0] = 0.0
        weight[k // 2] = 0.0
    return weight


def _block(name: str, draw_block) -> tuple[int, int] | None:
    return draw_block if formats.get(name).takes_block else None


def _shapes(arrays) -> list[tuple[int, ...]]:
    return [tuple(a.shape) for a in arrays]


@settings(max_examples=60, deadline=None)
@given(weights(), st.sampled_from(list(FORMATS)), st.sampled_from(BLOCK_SHAPES))
def test_round_trip_is_exact_and_the_arrays_are_the_layout(weight, name, block):
    assume(name != "segments" or weight.shape[1] >= 16)  # a window is 16 columns
    format = formats.get(name)
    block = _block(name, block)
    arrays = format.encode(weight, block)
    again = format.decode(arrays, weight.shape, block)
    assert again.dtype == np.float32
    np.testing.assert_array_equal(again, weight)
    assert np.count_nonzero(again) == np.count_nonzero(weight)
    k, n = weight.shape
    stored = format.stored(_shapes(arrays))
    layout = format.layout(k, n, stored, block)
    assert [spec.name for spec in layout] == list(format.arrays)
    assert [(spec.dtype, spec.shape) for spec in layout] == [(a.dtype, a.shape) for a in arrays]
    # Every format's model claims the arrays' real size when all rows are read.
    assert format.bytes_read(k, n, stored, block=block) == sum(a.nbytes for a in arrays)


@settings(max_examples=60, deadline=None)
@given(weights(), st.sampled_from([name for name, f in FORMATS.items() if f.skips_rows]), st.data())
def test_bytes_read_of_active_rows_is_the_size_of_their_arrays(weight, name, data):
    """A gated kernel reads the rows of active inputs only: with ``a`` rows active and
    ``nnz`` values stored in them, the model counts what those rows alone would store."""
    assume(name != "segments" or weight.shape[1] >= 16)
    format = formats.get(name)
    k, n = weight.shape
    active = np.array(data.draw(st.lists(st.booleans(), min_size=k, max_size=k)))
    rows = format.encode(weight[active])
    stored = format.stored(_shapes(rows)) or 0
    assert format.bytes_read(k, n, stored, active_rows=int(active.sum())) == sum(a.nbytes for a in rows)


def test_formats_whose_kernels_read_every_row_refuse_active_rows():
    with pytest.raises(ValueError, match="csr kernels read every row"):
        formats.get("csr").bytes_read(8, 8, 4, active_rows=2)


def test_the_stored_count_is_what_the_kernel_symbols_carry():
    """nnz for csr, bitmask and the dual layouts, blocks for bsr, 16 per window for
    segments, and the multiply-adds per row of x follow (a bsr block is R x C)."""
    rng = np.random.default_rng(0)
    weight_t = rng.standard_normal((64, 48)).astype(np.float32)
    weight_t *= np.repeat(rng.random((4, 48)) < 0.25, 16, axis=0)  # whole 16x1 blocks of W^T
    weight = np.ascontiguousarray(weight_t.T)
    nnz = np.count_nonzero(weight)
    blocks = nnz // 16
    for name, expected in (("csr", nnz), ("bitmask", nnz), ("bitmask_rows", nnz), ("bitmask_words", nnz),
                           ("bsr", blocks), ("segments", 16 * blocks), ("dense", None), ("panels", None)):
        format = formats.get(name)
        block = (16, 1) if format.takes_block else None
        stored = format.stored(_shapes(format.encode(weight, block)))
        assert stored == expected, name
        assert format.multiply_adds(48, 64, stored, block) == (48 * 64 if stored is None else 16 * blocks), name


def test_bytes_match_the_cost_models_formulas():
    """The formulas the cost model has always used (decisions must not move)."""
    k, n, nnz = 2048, 5632, 3_000_000
    assert formats.get("dense").bytes_read(k, n, k * n) == 4 * k * n
    assert formats.get("csr").bytes_read(k, n, nnz) == nnz * 6 + (n + 1) * 4
    assert formats.get("csr").bytes_read(40000, n, nnz) == nnz * 8 + (n + 1) * 4
    assert formats.get("bitmask").bytes_read(k, n, nnz) == n * (k // 8) + nnz * 4 + (n + 1) * 4
    assert formats.get("bsr").bytes_read(k, n, 1000, block=(16, 1)) == 1000 * (64 + 2) + (n // 16 + 1) * 4
    assert formats.get("bitmask_rows").bytes_read(k, n, nnz) == k * (n // 8) + nnz * 4 + (k + 1) * 4
    assert formats.get("bitmask_words").bytes_read(k, n, nnz, active_rows=100) == 100 * (n // 32) * 8 + nnz * 4
    assert formats.get("dense").bytes_read(k, n, 0, active_rows=100) == 100 * n * 4


def _kernel_facts():
    """Facts for every kernel of every format, as strategies."""
    cases = []
    for format in FORMATS.values():
        for kernel in format.kernels:
            cases.append(st.builds(
                KernelFacts, st.just(format.name), st.just(kernel.target), st.just(kernel.role),
                st.integers(1, 4096), st.integers(1, 40000), st.integers(1, 40000),
                st.integers(0, 10**7) if "nnz" in kernel.fields or "nnzb" in kernel.fields else st.none(),
                st.sampled_from([(16, 1), (4, 4), (1, 8)]) if "block" in kernel.fields else st.none(),
                st.sampled_from(["int16", "int32"]) if "index" in kernel.fields else st.none(),
                st.sampled_from(["int32", "int64"]) if "ids" in kernel.fields else st.none(),
                st.booleans() if "gate" in kernel.fields else st.none()))
    return st.one_of(cases)


@settings(max_examples=200, deadline=None)
@given(_kernel_facts())
def test_symbols_parse_back_into_their_facts(facts):
    symbol = formats.get(facts.format).symbol(facts)
    assert formats.parse_symbol(symbol) == facts


@pytest.mark.parametrize("name", [
    "decode_attention_h9_g3_d64_s256", "fused_matmul_add", "take", "csr_matmul_m1_k4_n4_nnz3",
    "bsr_matmul_m1_k48_n64_b16_nnzb12_int16", "dense_matmul_m1_k2_n3_extra", "gated_matmul_m1_k2_n3_both",
    "cuda_dense_matmul_m1_k2_n3", "dual_matmul_m1_k2_n3_nnz4_scalar_segments", "csr_matmul_m1_k4_n4_nnz3_int8"])
def test_other_names_are_not_our_kernels(name):
    assert formats.parse_symbol(name) is None


def test_flops_are_two_per_stored_weight_per_row():
    bsr = formats.parse_symbol("bsr_matmul_m3_k48_n64_b16x1_nnzb12_int16")
    assert formats.get("bsr").flops(bsr) == 2.0 * 3 * 12 * 16 * 1
    gated = formats.parse_symbol("cuda_gated_matmul_m2_k48_n64_channel")
    assert (gated.format, gated.per_channel, formats.get("dense").flops(gated)) == ("dense", True, 2.0 * 2 * 48 * 64)
    gather = formats.parse_symbol("bitmask_gather_r5_k48_n64_nnz100_int64")
    assert (gather.role, gather.m, formats.get("bitmask").flops(gather)) == ("gather", 5, None)


def test_an_unknown_format_lists_the_choices():
    with pytest.raises(ValueError, match="unknown format 'coo'; choose one of dense, csr, bsr, bitmask, panels"):
        formats.get("coo")


def test_the_table_and_the_onnx_formats():
    assert formats.onnx_formats() == ("dense", "csr", "bsr", "bitmask")
    assert formats.formats_with_kernel("cuda", "matmul", formats.onnx_formats()) == ("csr", "bsr")
    assert formats.formats_with_kernel("cpu", "gather") == ("csr", "bitmask")
    for format in FORMATS.values():
        assert format.value_dtype == "float32" and format.group_size is None


def test_formats_import_nothing_else_from_the_project():
    project = {path.name for path in ROOT.iterdir() if path.is_dir()} - {"formats"}
    for path in (ROOT / "formats").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(name.split(".")[0] in project for name in names), (path.name, names)


def _cpu_kernels():
    import targets.cpu.kernels as dense
    import targets.cpu.sparse_kernels as sk

    return [
        (dense.dense_matmul_func(3, 40, 20), "panels", "matmul", dict(m=3, k=40, n=20)),
        (sk.csr_matmul_func(2, 40, 20, 77, "int32"), "csr", "matmul", dict(m=2, k=40, n=20, nnz=77, index_dtype="int32")),
        (sk.bsr_matmul_func(1, 40, 20, (4, 1), 9, "int16"), "bsr", "matmul",
         dict(m=1, k=40, n=20, nnz=9, block=(4, 1), index_dtype="int16")),
        (sk.bitmask_matmul_func(5, 40, 20, 33), "bitmask", "matmul", dict(m=5, k=40, n=20, nnz=33)),
        (sk.gated_matmul_func(1, 40, 20, True), "dense", "gated", dict(m=1, k=40, n=20, per_channel=True)),
        (sk.dual_matmul_func(2, 40, 20, 51, False), "bitmask_rows", "gated", dict(m=2, k=40, n=20, nnz=51, per_channel=False)),
        (sk.segment_matmul_func(1, 40, 20, 6, False), "segments", "gated", dict(m=1, k=40, n=20, nnz=96, per_channel=False)),
        (sk.csr_gather_func(4, 40, 20, 77, "int16", "int32"), "csr", "gather",
         dict(m=4, k=40, n=20, nnz=77, index_dtype="int16", id_dtype="int32")),
        (sk.bitmask_gather_func(4, 40, 20, 77), "bitmask", "gather", dict(m=4, k=40, n=20, nnz=77, id_dtype="int64")),
    ]


def _cuda_kernels():
    import targets.cuda.sparse_kernels as sk

    return [
        (sk.csr_matmul_func(2, 40, 20, 77, "int16"), "csr", "matmul", dict(m=2, k=40, n=20, nnz=77, index_dtype="int16")),
        (sk.bsr_matmul_func(3, 40, 20, (16, 1), 9, "int32"), "bsr", "matmul",
         dict(m=3, k=40, n=20, nnz=9, block=(16, 1), index_dtype="int32")),
        (sk.gated_matmul_func(1, 40, 20, False), "dense", "gated", dict(m=1, k=40, n=20, per_channel=False)),
        (sk.dual_matmul_func(4, 40, 20, 51, True), "bitmask_words", "gated", dict(m=4, k=40, n=20, nnz=51, per_channel=True)),
    ]


@pytest.mark.slow
@pytest.mark.parametrize("target, kernels", [("cpu", _cpu_kernels), ("cuda", _cuda_kernels)])
def test_symbols_are_the_kernels_global_symbols(target, kernels):
    """The format's symbol of a kernel's facts is the symbol the kernel builder gives its
    PrimFunc, and parses back into those facts (the profilers read kernels' costs so)."""
    for func, name, role, values in kernels():
        facts = KernelFacts(name, target, role, **values)
        symbol = str(func.attrs["global_symbol"])
        assert formats.get(name).symbol(facts) == symbol
        assert formats.parse_symbol(symbol) == facts
