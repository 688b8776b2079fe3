"""The CUDA sparse kernels (``targets.cuda.sparse_kernels``), checked three ways.

1. nvcc compiles the generated CUDA source to PTX for sm_80 and sm_90, and every
   ``__global__`` kernel's threads per block and static shared memory, read from the PTX
   and from the source, stay within ``ARCH_LIMITS``; so do its registers (``ptxas -v``),
   with no spills, and every kernel with shared memory has a barrier (skipped without
   nvcc).
2. The same TIR with its thread-bound loops made serial (``serial_copy``), built for the
   host by LLVM, matches numpy: SmolLM2's 576x1536 and 1536x576 at m = 1 and 4, CSR and
   BSR at 70-90 % weight sparsity, BSR with partial edge blocks, gated and dual kernels
   with scalar and per-channel thresholds, inputs exactly at the threshold (inactive: the
   gate is ``|x| > t``), an all-inactive input and all-zero weights (``nnz = 0``).
3. On a CUDA device (``gpu`` marker), the real kernels match numpy.

Tolerance: ``rtol = atol = 1e-5`` against a float64 reference. With ``W`` scaled by
``1/sqrt(K)`` the outputs are O(1); the kernels add in fp32 in another order than numpy
(per lane, then through shared memory), which moves a K = 1536 sum by a few 1e-6 at most,
while an indexing, masking or synchronisation bug moves outputs by O(0.1). The output is
filled with NaN first, so an element a kernel does not write fails the comparison.
"""

from __future__ import annotations

import os
import shutil

os.environ.setdefault("TVM_NUM_THREADS", str(os.cpu_count() or 1))

import numpy as np
import pytest

from passes.sparse_formats import decode, encode
from targets.cuda import sparse_kernels as sk
from targets.cuda.codegen import kernel_report, within_limits
from test_cli import assert_one_sentence_error, sparsecc
from test_sparse_kernels import _weight

RTOL = 1e-5
ATOL = 1e-5
SMOLLM2_SHAPES = ((576, 1536), (1536, 576))
needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")


def _activations(m, k, seed, inactive=0.5, per_channel=True):
    """``(x, threshold)``: about ``inactive`` of the inputs below the threshold in every
    row, a few exactly at it (inactive), and the rest above it."""
    rng = np.random.default_rng(seed)
    threshold = (
        rng.uniform(0.2, 0.6, k).astype(np.float32) if per_channel else np.array([0.4], np.float32)
    )
    limit = np.broadcast_to(threshold, (k,))
    x = (rng.uniform(1.05, 2.0, (m, k)) * limit * rng.choice([-1, 1], (m, k))).astype(np.float32)
    off = rng.random(k) < inactive
    x[:, off] *= np.float32(0.5)
    x[0, 1::7] = np.sign(x[0, 1::7]) * limit[1::7]  # exactly at the threshold: inactive
    return x, threshold


def _gate(x, threshold):
    return np.where(np.abs(x) > threshold, x, 0).astype(np.float32)


# --- The cases: (PrimFunc, inputs before y, expected y) --------------------------------


def csr_case(m, k, n, sparsity, seed, index_dtype="int16"):
    weight = _weight(k, n, sparsity, seed)
    arrays = encode(weight, "csr")
    arrays[1] = arrays[1].astype(index_dtype)
    x = np.random.default_rng(seed + 1).standard_normal((m, k)).astype(np.float32)
    func = sk.csr_matmul_func(m, k, n, arrays[2].size, index_dtype)
    return func, [x, *arrays], x.astype(np.float64) @ weight


def bsr_case(m, k, n, block, sparsity, seed):
    weight = _weight(k, n, sparsity, seed, block)
    arrays = encode(weight, "bsr", block)
    assert np.array_equal(decode(arrays, "bsr", (k, n), block), weight)
    x = np.random.default_rng(seed + 1).standard_normal((m, k)).astype(np.float32)
    func = sk.bsr_matmul_func(m, k, n, block, arrays[2].shape[0], str(arrays[1].dtype))
    return func, [x, *arrays], x.astype(np.float64) @ weight


def gated_case(m, k, n, per_channel, seed, inactive=0.5, k_parts=None):
    weight = _weight(k, n, 0.0, seed)
    x, threshold = _activations(m, k, seed + 1, inactive, per_channel)
    func = sk.gated_matmul_func(m, k, n, per_channel, k_parts=k_parts)
    return func, [x, threshold, weight], _gate(x, threshold).astype(np.float64) @ weight


def dual_case(m, k, n, per_channel, sparsity, seed, inactive=0.5, k_parts=None):
    weight = _weight(k, n, sparsity, seed)
    arrays = sk.pack_dual_weight(weight)
    x, threshold = _activations(m, k, seed + 1, inactive, per_channel)
    func = sk.dual_matmul_func(m, k, n, arrays[2].size, per_channel, k_parts=k_parts)
    return func, [x, threshold, *arrays], _gate(x, threshold).astype(np.float64) @ weight


#: Every case of the numerical checks, by name.
CASES = {
    "csr-576x1536-m1-70%": lambda: csr_case(1, 576, 1536, 0.7, 1),
    "csr-1536x576-m4-90%": lambda: csr_case(4, 1536, 576, 0.9, 2),
    "csr-odd-m8-int32": lambda: csr_case(8, 45, 37, 0.8, 3, "int32"),
    "csr-all-zero-m2": lambda: csr_case(2, 40, 33, 1.0, 17),
    "bsr16x1-576x1536-m1-90%": lambda: bsr_case(1, 576, 1536, (16, 1), 0.9, 4),
    "bsr4x4-1536x576-m4-80%": lambda: bsr_case(4, 1536, 576, (4, 4), 0.8, 5),
    "bsr16x4-edges-m3": lambda: bsr_case(3, 102, 70, (16, 4), 0.7, 6),
    "bsr16x16-edges-m2": lambda: bsr_case(2, 90, 40, (16, 16), 0.7, 7),
    "bsr1x16-edges-m1": lambda: bsr_case(1, 70, 33, (1, 16), 0.7, 8),
    "gated-576x1536-m1-scalar": lambda: gated_case(1, 576, 1536, False, 9),
    "gated-1536x576-m4-channel": lambda: gated_case(4, 1536, 576, True, 10),
    "gated-odd-m8-channel-3parts": lambda: gated_case(8, 100, 70, True, 11, k_parts=3),
    "gated-all-inactive-m2": lambda: gated_case(2, 64, 96, True, 12, inactive=1.0),
    "dual-576x1536-m1-channel": lambda: dual_case(1, 576, 1536, True, 0.5, 13),
    "dual-1536x576-m4-scalar": lambda: dual_case(4, 1536, 576, False, 0.7, 14),
    "dual-odd-m3-scalar-5parts": lambda: dual_case(3, 100, 70, False, 0.5, 15, k_parts=5),
    "dual-all-inactive-m1": lambda: dual_case(1, 64, 96, False, 0.5, 16, inactive=1.0),
    "dual-all-zero-m2": lambda: dual_case(2, 64, 40, True, 1.0, 18),
}


def _run(kernel, inputs, out_shape, device) -> np.ndarray:
    import tvm

    y = tvm.runtime.tensor(np.full(out_shape, np.nan, np.float32), device)
    kernel(*[tvm.runtime.tensor(np.ascontiguousarray(a), device) for a in inputs], y)
    return y.numpy()


@pytest.mark.parametrize("name", list(CASES))
def test_serial_copy_matches_numpy(name):
    import tvm

    func, inputs, expected = CASES[name]()
    symbol = str(func.attrs["global_symbol"])
    serial = sk.serial_copy(func)
    kernel = tvm.compile(tvm.IRModule({symbol: serial}), target="llvm").mod[symbol]
    got = _run(kernel, inputs, expected.shape, tvm.cpu())
    np.testing.assert_allclose(got, expected, rtol=RTOL, atol=ATOL)


def test_serial_copy_has_no_thread_bindings():
    from tvm import tirx

    func = sk.gated_matmul_func(2, 64, 64, False)
    kinds = []

    def collect(stmt):
        if isinstance(stmt, tirx.SeqStmt):
            for s in stmt.seq:
                collect(s)
        elif isinstance(stmt, tirx.For):
            kinds.append(stmt.kind)
            collect(stmt.body)
        elif isinstance(stmt, tirx.IfThenElse):
            collect(stmt.then_case)

    collect(func.body)
    assert tirx.ForKind.THREAD_BINDING in kinds
    kinds.clear()
    collect(sk.serial_copy(func).body)
    assert kinds and tirx.ForKind.THREAD_BINDING not in kinds


def test_gate_cases_have_inactive_and_active_inputs():
    # The gated checks above mean something only if the gate really drops inputs.
    for name in ("gated-1536x576-m4-channel", "dual-576x1536-m1-channel"):
        _, (x, threshold, *_), _ = CASES[name]()
        active = np.abs(x) > threshold
        assert 0.3 < active.mean() < 0.7
        assert (np.abs(x) == np.broadcast_to(threshold, x.shape)).any()
    _, (x, threshold, *_), expected = CASES["gated-all-inactive-m2"]()
    assert not (np.abs(x) > threshold).any() and not expected.any()


def test_dual_weight_round_trip():
    rng = np.random.default_rng(20)
    for k, n, sparsity in ((5, 70, 0.5), (33, 32, 0.0), (8, 1, 1.0), (64, 100, 0.9)):
        weight = rng.standard_normal((k, n)).astype(np.float32)
        weight[rng.random((k, n)) < sparsity] = 0
        bits, offsets, values = arrays = sk.pack_dual_weight(weight)
        assert bits.dtype == np.uint32 and bits.shape == (k, -(-n // 32))
        assert offsets.dtype == np.int32 and values.size == np.count_nonzero(weight)
        assert np.array_equal(sk.unpack_dual_weight(arrays, k, n), weight)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="at most 8 rows"):
        sk.csr_matmul_func(9, 16, 16, 4)
    with pytest.raises(ValueError, match="block sides"):
        sk.bsr_matmul_func(1, 16, 16, (3, 1), 4)
    with pytest.raises(ValueError, match="per_channel"):
        sk.gated_matmul_func(1, 16, 16, per_channel=1)
    with pytest.raises(ValueError, match="2-D float32"):
        sk.pack_dual_weight(np.zeros((4, 4)))


# --- nvcc and the per-architecture limits ----------------------------------------------


#: The kernels compiled to PTX: SmolLM2's shapes at m = 1 and 4, and one odd shape.
PTX_CASES = (
    "csr-576x1536-m1-70%",
    "csr-1536x576-m4-90%",
    "bsr16x1-576x1536-m1-90%",
    "bsr4x4-1536x576-m4-80%",
    "bsr16x4-edges-m3",
    "bsr16x16-edges-m2",
    "csr-all-zero-m2",
    "gated-576x1536-m1-scalar",
    "gated-1536x576-m4-channel",
    "dual-576x1536-m1-channel",
    "dual-1536x576-m4-scalar",
)


@pytest.fixture(scope="module")
def ptx_module():
    """One IRModule with every kernel of ``PTX_CASES`` (one nvcc run per arch)."""
    import tvm

    funcs = {}
    for name in PTX_CASES:
        func = CASES[name]()[0]
        funcs[str(func.attrs["global_symbol"])] = func
    return tvm.IRModule(funcs)


@needs_nvcc
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_kernels_compile_to_ptx_within_limits(ptx_module, arch):
    from targets.cuda.codegen import compile_ptx, cuda_source, ptxas_usage

    source = cuda_source(ptx_module, arch)
    ptx = compile_ptx(source, arch)
    assert f".target {arch}" in ptx
    from_source = kernel_report(source)
    from_ptx = kernel_report(ptx)
    # One kernel per CSR and BSR function, two (the split-K sum) per gated and dual one.
    symbols = [str(gv.name_hint) for gv in ptx_module.get_global_vars()]
    expected = sum(2 if "gated" in s or "dual" in s else 1 for s in symbols)
    assert len(from_ptx) == len(from_source) == expected
    assert sorted(k["name"] for k in from_ptx) == sorted(k["name"] for k in from_source)
    by_name = {k["name"]: k for k in from_source}
    for kernel in from_ptx:
        assert kernel["threads_per_block"] == by_name[kernel["name"]]["threads_per_block"]
        assert kernel["static_shared_bytes"] == by_name[kernel["name"]]["static_shared_bytes"]
    assert any(k["static_shared_bytes"] > 0 for k in from_ptx)
    # Every kernel that shares memory between phases synchronises between them.
    for kernel in from_ptx:
        assert (kernel["barriers"] > 0) == (kernel["static_shared_bytes"] > 0), kernel
    # ptxas: registers within the limit, and the per-thread accumulators not spilled.
    usage = ptxas_usage(ptx, arch)
    for kernel in from_ptx:
        kernel.update(usage[kernel["name"]])
        assert kernel["shared_bytes"] == kernel["static_shared_bytes"]
        assert kernel["spill_stores"] == 0 and kernel["spill_loads"] == 0, kernel
    assert within_limits(from_ptx, arch) == []


@needs_nvcc
def test_kernel_facts_of_one_function():
    from targets.cuda.codegen import kernel_facts

    facts = kernel_facts(sk.gated_matmul_func(2, 64, 96, True), "sm_90")
    assert [f["name"] for f in facts] == [
        "cuda_gated_matmul_m2_k64_n96_channel_kernel",
        "cuda_gated_matmul_m2_k64_n96_channel_kernel_1",
    ]
    assert [f["threads_per_block"] for f in facts] == [256, sk.REDUCE_THREADS]
    # lanes[m * 32, GATED_WARPS] floats; the split-K sum needs no shared memory.
    assert [f["static_shared_bytes"] for f in facts] == [2 * 32 * sk.GATED_WARPS * 4, 0]
    assert all(0 < f["registers"] <= 255 for f in facts)


def test_kernel_report_reads_ptx_and_source_and_flags_limits():
    ptx = """
.visible .entry small(
    .param .u64 small_param_0
)
.maxntid 256, 1, 1
{
    .shared .align 4 .b8 _ZZ5smallE5lanes[3072];
}
.visible .entry big(
    .param .u64 big_param_0
)
.maxntid 32, 64, 1
{
    .shared .align 4 .b8 buf[40000];
    .shared .align 4 .b8 more[20000];
}
"""
    report = kernel_report(ptx)
    assert report == [
        {"name": "small", "threads_per_block": 256, "static_shared_bytes": 3072, "barriers": 0},
        {"name": "big", "threads_per_block": 2048, "static_shared_bytes": 60000, "barriers": 0},
    ]
    report[0]["registers"] = 256
    problems = within_limits(report, "sm_90")
    assert len(problems) == 3
    assert problems[0].startswith("small: 256 registers") and all(p.startswith("big:") for p in problems[1:])
    source = (
        'extern "C" __global__ void __launch_bounds__(128) f(float* x);\n'
        'extern "C" __global__ void __launch_bounds__(128) f(float* x) {\n'
        "  __shared__ alignas(64) float lanes_ptr[384];\n  __syncthreads();\n}\n"
    )
    assert kernel_report(source) == [
        {"name": "f", "threads_per_block": 128, "static_shared_bytes": 1536, "barriers": 1}
    ]


def test_compile_ptx_reports_nvcc_failure_in_one_sentence(monkeypatch):
    from runtime.errors import SparseccError
    from targets.cuda.codegen import compile_ptx

    if shutil.which("nvcc") is not None:
        with pytest.raises(SparseccError, match="nvcc could not compile"):
            compile_ptx("this is not CUDA", "sm_90")
    monkeypatch.setenv("PATH", "")
    with pytest.raises(SparseccError, match="nvcc was not found"):
        compile_ptx("", "sm_90")


# --- On a GPU --------------------------------------------------------------------------


def _has_cuda_device() -> bool:
    import tvm

    return bool(tvm.cuda(0).exist)


@pytest.mark.gpu
@pytest.mark.skipif(not _has_cuda_device(), reason="no CUDA device")
@pytest.mark.parametrize("name", list(CASES))
def test_kernels_on_gpu_match_numpy(name):
    import tvm

    from targets.cuda.codegen import use_nvcc_without_nvrtc

    use_nvcc_without_nvrtc()  # the module is compiled for the device when it is loaded
    device = tvm.cuda(0)
    arch = "sm_" + device.compute_version.replace(".", "")
    func, inputs, expected = CASES[name]()
    symbol = str(func.attrs["global_symbol"])
    target = tvm.target.Target({"kind": "cuda", "arch": arch})
    kernel = tvm.compile(tvm.IRModule({symbol: func}), target=target).mod[symbol]
    got = _run(kernel, inputs, expected.shape, device)
    np.testing.assert_allclose(got, expected, rtol=RTOL, atol=ATOL)


# --- The benchmark without a GPU -------------------------------------------------------


@pytest.mark.skipif(_has_cuda_device(), reason="a CUDA device is present")
def test_bench_kernels_cuda_without_device_is_one_sentence(capsys, tmp_path):
    out = tmp_path / "bench.json"
    code, _, err = sparsecc(capsys, "bench", "kernels", "--target", "cuda", "--json", str(out))
    assert_one_sentence_error(code, err, "no CUDA device was found;")
    assert not out.exists()
