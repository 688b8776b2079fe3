"""Benchmarks the sparse kernels against dense baselines (``sparsecc bench kernels``).

For each weight shape ``(K, N)`` and each case (a weight sparsity, an activation sparsity,
a kernel and a format) the benchmark times, in one process and interleaved so that drift
in the host hits all alike:

- ``ours``: the case's kernel from ``targets.cpu.sparse_kernels`` (or the dense kernel);
- ``dense``: ``targets.cpu.kernels.dense_matmul_func`` on ``pack_dense_weight(W)``;
- ``onnxruntime``: a one-node ONNX ``MatMul`` with ``W`` as an initializer, on a thread
  pool of one thread per core;
- ``numpy``: ``np.matmul`` into a preallocated output.

The baselines always multiply by the dense ``W`` (zeros included): they are what the
model would run without this compiler. Weights are cold: each implementation rotates over
enough copies of its weight arrays that together they exceed ``COLD_BYTES`` (several times
the last-level cache), so every call reads its weights from DRAM, as one decode step of a
real model does. Each call is timed on its own and the median is reported. Before each
implementation's pass over its copies the benchmark pauses ``SETTLE_SECONDS``, so that the
worker threads of the runtime timed before (which spin for a while after a call) have gone
idle; and the first shape starts with ``WARM_UP_SECONDS`` of untimed streaming.

Cases, per shape: the dense kernel; unstructured weight sparsity 50/70/90 % in the format
``passes.sparse_formats.decide`` (the compiler's choice, with the CPU's kernel costs) picks, and in CSR
(only at 90 % with ``quick``);
16x1-block sparsity 50/70/90 % (BSR, again as chosen); activation sparsity 0/40/50/70 %
(gated kernel on the dense weight); 50 % weights plus 50 % activations (dual kernel over
bitmask rows); and 70 % 16x1-block weights plus 50 % activations (dual kernel over windows
of 16 columns, the one block-pruned decoders use).
The full run adds batch 8 for a subset of the cases on one shape. The activation-sparse
inputs are inactive in the same channels in every row of a batch. Each case's arrays and
the bytes its kernel reads (the "ideal" column's denominator) are its format's, from
``formats`` (``encode``, ``bytes_read`` over the active rows).

``--target cuda`` runs the same kinds of case with the kernels of
``targets.cuda.sparse_kernels`` on the first NVIDIA GPU (see the section at the end of
this module); without a CUDA device it stops with one sentence and writes nothing.
"""

from __future__ import annotations

import gc
import json
import os
import platform
import statistics
import time

# Before tvm is imported: its thread pool otherwise uses half of the cores on x86.
os.environ.setdefault("TVM_NUM_THREADS", str(os.cpu_count()))

import numpy as np

import formats

FULL_SHAPES = ((576, 1536), (1536, 576), (2048, 5632), (4096, 11008))
QUICK_SHAPES = FULL_SHAPES[:3]
WEIGHT_SPARSITIES = (0.5, 0.7, 0.9)
ACTIVATION_SPARSITIES = (0.0, 0.4, 0.5, 0.7)
#: The block of the structured-sparsity cases, as (rows of W^T, columns of W^T): 16
#: outputs that share one input, so a block is one contiguous 64-byte run of W's row.
BENCH_BLOCK = (16, 1)
#: Batch-8 cases run on this shape only (full run).
BATCH8_SHAPE = (2048, 5632)
#: Bytes of weight copies each implementation rotates over: several times the 480 MB L3
#: of the machines this was written on, so that no weight is still cached when reused.
COLD_BYTES = 1.0e9
QUICK_COLD_BYTES = 0.8e9
#: Calls timed per implementation and case: at least this many, and two passes over the
#: copies.
MIN_CALLS = 40
QUICK_MIN_CALLS = 20
#: Pause before each implementation's pass over its copies (see ``_time_rotation``).
SETTLE_SECONDS = 0.2
#: Untimed streaming before the first case (see ``_warm_up``).
WARM_UP_SECONDS = 3.0
# onnx writes a newer IR version by default than some onnxruntime releases read.
ONNX_IR_VERSION = 8
# Any kernel must match x @ W within this (relative to max |x @ W|) before it is timed.
MAX_REL_ERROR = 1e-4
# Gated inputs: the active ones are 0.5..1.5 in magnitude, the inactive ones below 0.1,
# and the threshold sits between, so the activation sparsity is exact at any batch.
GATE_THRESHOLD = 0.25


def _weight(rng, k: int, n: int, sparsity: float, block: tuple[int, int] | None) -> np.ndarray:
    """A [k, n] fp32 weight with exactly ``sparsity`` zeros, unstructured or in blocks."""
    weight = rng.standard_normal((k, n), dtype=np.float32) / np.float32(np.sqrt(k))
    if sparsity == 0:
        return weight
    if block is None:
        drop = rng.permutation(k * n)[: int(round(sparsity * k * n))]
        weight.reshape(-1)[drop] = 0
        return weight
    rows, cols = block  # of W^T: rows group outputs (n), columns group inputs (k)
    tiles_n, tiles_k = -(-n // rows), -(-k // cols)
    mask = np.ones(tiles_k * tiles_n, dtype=bool)
    mask[rng.permutation(mask.size)[: int(round(sparsity * mask.size))]] = False
    weight *= np.repeat(np.repeat(mask.reshape(tiles_k, tiles_n), cols, 0), rows, 1)[:k, :n]
    return weight


def _activations(rng, m: int, k: int, sparsity: float) -> np.ndarray:
    """``x`` [m, k] whose inputs are inactive (below ``GATE_THRESHOLD``) in a random
    ``sparsity`` fraction of the channels, in every row alike."""
    x = rng.uniform(0.5, 1.5, (m, k)).astype(np.float32) * rng.choice([-1, 1], (m, k))
    inactive = rng.permutation(k)[: int(round(sparsity * k))]
    x[:, inactive] = rng.uniform(-0.1, 0.1, (m, inactive.size)).astype(np.float32)
    return x.astype(np.float32)


def matmul_model(weight: np.ndarray) -> bytes:
    """A one-node ONNX model ``y = x @ weight`` with a symbolic number of rows."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    k, n = weight.shape
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])],
        "matmul",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["M", n])],
        [numpy_helper.from_array(weight, "W")],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=ONNX_IR_VERSION
    )
    onnx.checker.check_model(model)
    return model.SerializeToString()


class _OrtSessions:
    """onnxruntime sessions sharing one process-wide pool of one thread per core.

    The benchmark holds a session per weight copy; with a pool per session, the pools of
    the sessions that ran last keep spinning while the next one runs and starve it of
    cores (a model with many MatMuls in one session shares one pool, and so do these).
    """

    #: Whether this process's global pool exists (it can be created once per process).
    _global_pool = False

    def __init__(self, threads: int):
        import onnxruntime as ort

        self.ort = ort
        self.threads = threads
        if not _OrtSessions._global_pool:
            try:
                ort.capi._pybind_state.set_global_thread_pool_sizes(threads, 1)
                _OrtSessions._global_pool = True
            except Exception:  # created by other code first, or not supported: own pools
                pass
        self.global_pool = _OrtSessions._global_pool

    def session(self, model: bytes):
        options = self.ort.SessionOptions()
        if self.global_pool:
            options.use_per_session_threads = False
        else:
            options.intra_op_num_threads = self.threads
        return self.ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def _copies(nbytes: int, cold_bytes: float) -> int:
    return max(2, int(-(-cold_bytes // max(nbytes, 1))))


def _time_rotation(calls, times: list[float]) -> None:
    # The runtimes' worker threads spin for a while after their last call (OpenBLAS for
    # up to ~0.1 s); on a machine with few cores, spinning workers of the implementation
    # timed before would take the cores from this one's workers. Let them go idle first.
    time.sleep(SETTLE_SECONDS)
    for call in calls:
        start = time.perf_counter()
        call()
        times.append((time.perf_counter() - start) * 1e3)


class _Baselines:
    """The dense kernel, onnxruntime and numpy for one shape and batch, with cold copies."""

    def __init__(self, sessions: "_OrtSessions", weight: np.ndarray, m: int, cold_bytes: float):
        from targets.cpu.kernels import dense_matmul_func, pack_dense_weight

        k, n = weight.shape
        packed = pack_dense_weight(weight)
        model = matmul_model(weight)
        copies = _copies(weight.nbytes, cold_bytes)
        self.ours_weights, self.numpy_weights, self.sessions = [], [], []
        # Allocated in turn: on a VM, memory allocated first may stream at another speed
        # than memory allocated later, so no implementation gets all of one kind.
        for _ in range(copies):
            self.ours_weights.append(_tensor(packed))
            self.numpy_weights.append(weight.copy())
            self.sessions.append(sessions.session(model))
        self.kernel = _compile(dense_matmul_func(m, k, n))
        self.m, self.k, self.n = m, k, n
        self.weight = weight
        self.ort = sessions.ort

    def calls(self, x: np.ndarray) -> dict:
        """Timed calls on ``x``, each implementation checked first."""
        expected = x.astype(np.float64) @ self.weight.astype(np.float64)
        tvm_x = _tensor(x)
        y_dense = _tensor(np.zeros((self.m, self.n), np.float32))
        self.kernel(tvm_x, self.ours_weights[0], y_dense)
        _check("dense kernel", y_dense.numpy(), expected)
        y_ort = self.ort.OrtValue.ortvalue_from_numpy(np.zeros((self.m, self.n), np.float32))
        bindings = []
        for session in self.sessions:
            binding = session.io_binding()
            binding.bind_cpu_input("x", x)
            binding.bind_ortvalue_output("y", y_ort)
            bindings.append((session, binding))
        _check("onnxruntime", self.sessions[0].run(None, {"x": x})[0], expected)
        y_np = np.zeros((self.m, self.n), np.float32)
        return {
            "dense": [lambda w=w: self.kernel(tvm_x, w, y_dense) for w in self.ours_weights],
            "onnxruntime": [lambda s=s, b=b: s.run_with_iobinding(b) for s, b in bindings],
            "numpy": [lambda w=w: np.matmul(x, w, out=y_np) for w in self.numpy_weights],
        }


def _tensor(array: np.ndarray):
    import tvm

    return tvm.runtime.tensor(array, tvm.cpu())


def _compile(func):
    import tvm

    from targets.cpu.host import host_target

    symbol = str(func.attrs["global_symbol"])
    return tvm.compile(tvm.IRModule({symbol: func}), target=host_target()).mod[symbol]


def _check(name: str, got: np.ndarray, expected: np.ndarray) -> None:
    error = float(np.abs(got - expected).max() / max(np.abs(expected).max(), 1e-30))
    if not error < MAX_REL_ERROR:
        raise AssertionError(f"{name}: relative error {error:.2e} against numpy")


def _array_bytes(arrays) -> int:
    return int(sum(a.nbytes for a in arrays))


def _moved(layout: str, weight: np.ndarray, arrays: list[np.ndarray], active: np.ndarray | None = None) -> int:
    """Bytes the kernel reads from ``arrays`` (``weight`` in ``formats`` layout ``layout``):
    with ``active`` (a mask over K) those of the active inputs' rows only."""
    described = formats.get(layout)
    k, n = weight.shape
    block = tuple(arrays[-1].shape[1:]) if described.takes_block else None
    if active is None:
        return described.bytes_read(k, n, described.stored([a.shape for a in arrays]) or 0, block=block)
    # The active rows' stored values: those of the same layout of those rows alone.
    stored = described.stored([a.shape for a in described.encode(weight[active])]) if active.any() else 0
    return described.bytes_read(k, n, stored or 0, active_rows=int(active.sum()))


def _sparse_case(weight, x, fmt, block):
    """(kernel, weight arrays, bytes read) for ``x @ weight`` in format ``fmt``."""
    import targets.cpu.sparse_kernels as sk

    m, k = x.shape
    n = weight.shape[1]
    arrays = formats.get(fmt).encode(weight, block)
    facts = formats.get(fmt).facts("cpu", "matmul", m, k, n, arrays, block)
    if fmt == "csr":
        func = sk.csr_matmul_func(m, k, n, facts.nnz, facts.index_dtype)
    elif fmt == "bsr":
        func = sk.bsr_matmul_func(m, k, n, block, facts.nnz, facts.index_dtype)
    elif fmt == "bitmask":
        func = sk.bitmask_matmul_func(m, k, n, facts.nnz)
    else:
        raise ValueError(f"no sparse kernel for format {fmt!r}")
    return _compile(func), arrays, _moved(fmt, weight, arrays)


def _active_rows(x: np.ndarray) -> np.ndarray:
    return (np.abs(x) > GATE_THRESHOLD).any(axis=0)


def _gated_case(weight, x):
    """(kernel, weight arrays, bytes read) for ``gate(x) @ weight``, dense weight."""
    from targets.cpu.sparse_kernels import gated_matmul_func

    m, k = x.shape
    n = weight.shape[1]
    kernel = _compile(gated_matmul_func(m, k, n, per_channel=False))
    return kernel, [weight], _moved("dense", weight, [weight], _active_rows(x))


def _dual_case(weight, x):
    """(kernel, weight arrays, bytes read) for ``gate(x) @ weight``, sparse weight."""
    from targets.cpu.sparse_kernels import dual_matmul_func

    m, k = x.shape
    n = weight.shape[1]
    arrays = formats.get("bitmask_rows").encode(weight)
    kernel = _compile(dual_matmul_func(m, k, n, arrays[-1].size, per_channel=False))
    return kernel, arrays, _moved("bitmask_rows", weight, arrays, _active_rows(x))


def _segment_case(weight, x):
    """(kernel, weight arrays, bytes read) for ``gate(x) @ weight``, weight in windows of 16
    columns (the dual kernel the compiler picks for block-pruned weights)."""
    from targets.cpu.sparse_kernels import segment_matmul_func

    m, k = x.shape
    n = weight.shape[1]
    arrays = formats.get("segments").encode(weight)
    kernel = _compile(segment_matmul_func(m, k, n, arrays[1].size, per_channel=False))
    return kernel, arrays, _moved("segments", weight, arrays, _active_rows(x))


def _format_label(fmt: str, block) -> str:
    return f"bsr{block[0]}x{block[1]}" if fmt == "bsr" else fmt


def _cases(quick: bool, m: int):
    """(kernel kind, weight sparsity, block or None, activation sparsity, format or None)."""
    cases = [("dense", 0.0, None, 0.0, "dense")]
    for s in WEIGHT_SPARSITIES:
        cases.append(("sparse", s, None, 0.0, None))  # the format the compiler's cost model picks
        if not quick or s == 0.9:
            cases.append(("sparse", s, None, 0.0, "csr"))
    for s in WEIGHT_SPARSITIES:
        cases.append(("sparse", s, BENCH_BLOCK, 0.0, None))
    for a in ACTIVATION_SPARSITIES:
        cases.append(("gated", 0.0, None, a, "dense"))
    cases.append(("dual", 0.5, None, 0.5, "dual-bitmask"))
    cases.append(("dual", 0.7, BENCH_BLOCK, 0.5, "dual-segments"))
    if m > 1:  # batch 8: a subset
        keep = {
            ("dense", 0.0, None, 0.0, "dense"),
            ("sparse", 0.7, None, 0.0, None),
            ("sparse", 0.9, BENCH_BLOCK, 0.0, None),
            ("gated", 0.0, None, 0.5, "dense"),
            ("dual", 0.5, None, 0.5, "dual-bitmask"),
        }
        cases = [case for case in cases if case in keep]
    return cases


def _header() -> str:
    return (
        f"{'K x N':>11} {'M':>2} {'kernel':>6} {'format':>12} {'w%':>3} {'a%':>3} "
        f"{'ours ms':>8} {'dense':>7} {'ORT':>7} {'numpy':>7} "
        f"{'xORT':>5} {'xdense':>6} {'ideal':>5}"
    )


def _row(r: dict) -> str:
    k, n = r["shape"]
    return (
        f"{f'{k}x{n}':>11} {r['batch']:>2} {r['kernel']:>6} {r['format']:>12} "
        f"{round(100 * r['weight_sparsity']):>3} {round(100 * r['activation_sparsity']):>3} "
        f"{r['ms']:>8.3f} {r['dense_ms']:>7.3f} {r['onnxruntime_ms']:>7.3f} "
        f"{r['numpy_ms']:>7.3f} {r['speedup_vs_onnxruntime']:>5.2f} "
        f"{r['speedup_vs_dense']:>6.2f} {r['ideal_speedup']:>5.2f}"
    )


def _machine(tvm, cold_bytes: float) -> dict:
    import onnxruntime as ort

    from targets.cpu.host import host_target

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "target": str(host_target()),
        "tvm": tvm.__version__,
        "tvm_num_threads": int(os.environ["TVM_NUM_THREADS"]),
        "onnxruntime": ort.__version__,
        "onnxruntime_threads": os.cpu_count(),
        "numpy": np.__version__,
        "cold_bytes": cold_bytes,
    }


def _warm_up(baselines: "_Baselines", seconds: float = WARM_UP_SECONDS) -> None:
    """Runs the dense baselines untimed for a while: the first seconds of streaming on a
    fresh process (and VM) ran measurably slower than the rest."""
    x = np.ones((baselines.m, baselines.k), np.float32)
    calls = baselines.calls(x)
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        for rotation in calls.values():
            _time_rotation(rotation, [])


def _measure_case(baselines, case, rng, cold_bytes: float, min_calls: int) -> dict:
    """Builds, checks and times one case against the baselines; returns its result."""
    from passes.sparse_formats import decide
    from targets.cpu.legalize import COSTS

    kind, w_sparsity, structure, a_sparsity, fmt = case
    block = structure
    m, k, n = baselines.m, baselines.k, baselines.n
    # The baselines multiply by their own dense weight, not this case's: a dense
    # matmul's time does not depend on the values, so one set of copies serves all cases.
    weight = baselines.weight if w_sparsity == 0 else _weight(rng, k, n, w_sparsity, block)
    x = _activations(rng, m, k, a_sparsity)
    if kind in ("dense", "sparse") and fmt is None:
        # The format the compiler would pick (bytes moved over measured kernel efficiency).
        choice = decide(weight, COSTS)
        fmt, block = choice.format, choice.block
    if kind == "dense" or (kind == "sparse" and fmt == "dense"):
        kernel, arrays, moved, label = baselines.kernel, None, _moved("dense", weight, [weight]), "dense"
    elif kind == "sparse":
        kernel, arrays, moved = _sparse_case(weight, x, fmt, block)
        label = _format_label(fmt, block)
    elif kind == "gated":
        kernel, arrays, moved = _gated_case(weight, x)
        label = "dense+gate"
    elif fmt == "dual-segments":
        kernel, arrays, moved = _segment_case(weight, x)
        label = fmt
    else:
        kernel, arrays, moved = _dual_case(weight, x)
        label = fmt

    if kind in ("gated", "dual"):
        x_in = np.where(np.abs(x) > GATE_THRESHOLD, x, 0).astype(np.float32)
    else:
        x_in = x
    calls = baselines.calls(x_in)
    if arrays is None:  # the dense kernel itself
        calls["ours"] = calls["dense"]
    else:
        copies = [
            [_tensor(a) for a in arrays]
            for _ in range(_copies(_array_bytes(arrays), cold_bytes))
        ]
        lead = [_tensor(x)]
        if kind in ("gated", "dual"):
            lead.append(_tensor(np.array([GATE_THRESHOLD], np.float32)))
        y = _tensor(np.zeros((m, n), np.float32))
        kernel(*lead, *copies[0], y)
        _check(f"{kind} {label}", y.numpy(), x_in.astype(np.float64) @ weight.astype(np.float64))
        calls["ours"] = [lambda c=c: kernel(*lead, *c, y) for c in copies]

    times = {name: [] for name in calls}
    for rotation in calls.values():  # warm-up: first-call costs, thread start
        _time_rotation(rotation[:2], [])
    # Interleaved passes over each implementation's copies, until every implementation
    # has at least min_calls calls and two passes over the copies of the one with fewest.
    wanted = max(min_calls, 2 * min(len(c) for c in calls.values()))
    while min(len(t) for t in times.values()) < wanted:
        for name, rotation in calls.items():
            _time_rotation(rotation, times[name])
    ms = {name: statistics.median(t) for name, t in times.items()}
    return _result(
        case, label, k, n, m, block, ms["ours"], moved,
        dense_ms=ms["dense"],
        onnxruntime_ms=ms["onnxruntime"],
        numpy_ms=ms["numpy"],
        speedup_vs_onnxruntime=ms["onnxruntime"] / ms["ours"],
        speedup_vs_dense=ms["dense"] / ms["ours"],
    )


def _result(case, label: str, k: int, n: int, m: int, block, ms: float, moved: int, **baselines) -> dict:
    """One row of the results: the case, our median ``ms``, the baselines' columns (in
    order) and the ideal speedup, dense bytes over the ``moved`` bytes our kernel reads."""
    kind, w_sparsity, structure, a_sparsity, _ = case
    return {
        "kernel": kind,
        "format": label,
        "shape": [k, n],
        "batch": m,
        "weight_sparsity": w_sparsity,
        "activation_sparsity": a_sparsity,
        "weight_blocks": list(structure) if structure else None,
        "block": list(block) if block else None,
        "ms": ms,
        **baselines,
        "ideal_speedup": 4 * k * n / moved,
        "bytes_read": moved,
    }


def _return_freed_memory() -> None:
    """Makes glibc give large freed blocks back to the system at once.

    By default glibc raises its mmap threshold to the size of any large block freed, after
    which blocks of up to that size come from heaps that it rarely trims; the weight copies
    of each case (tens of MB each, of sizes that vary from case to case) then pile up
    across cases to many GB. A fixed threshold turns that adaptation off.
    """
    import ctypes

    m_mmap_threshold = -3
    try:
        ctypes.CDLL("libc.so.6").mallopt(m_mmap_threshold, 1 << 18)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def run_kernel_bench(
    quick: bool, json_path: str | None, plot_path: str | None, progress=print,
    target: str = "cpu",
) -> dict:
    """Runs the kernel benchmark and returns (and optionally writes) its results.

    Args:
        quick: three shapes, fewer calls and fewer CSR cases (about 3 minutes instead
            of about 10).
        json_path: where to write the results as JSON, or None.
        plot_path: where to write a PNG of the speedups over onnxruntime, or None.
        progress: called with each line of the table as it is measured.
        target: ``"cpu"``, or ``"cuda"`` for ``run_cuda_kernel_bench`` on the GPU.

    Returns:
        ``{"machine": {...}, "results": [...]}``; each result has ``kernel`` ("dense",
        "sparse", "gated" or "dual"), ``format``, ``shape`` [K, N], ``batch``,
        ``weight_sparsity``, ``activation_sparsity``, the median milliseconds ``ms``
        (ours), ``dense_ms``, ``onnxruntime_ms`` and ``numpy_ms``, the speedups
        ``speedup_vs_onnxruntime`` and ``speedup_vs_dense``, and ``ideal_speedup``, the
        bytes of the dense weight over the bytes our kernel reads.

    Raises:
        SparseccError: for an unknown target, or ``cuda`` without a CUDA device.
    """
    from runtime.errors import SparseccError

    if target == "cuda":
        return run_cuda_kernel_bench(quick, json_path, plot_path, progress)
    if target != "cpu":
        raise SparseccError(f"unknown benchmark target {target!r}; choose cpu or cuda.")
    import tvm

    _return_freed_memory()
    cold_bytes = QUICK_COLD_BYTES if quick else COLD_BYTES
    min_calls = QUICK_MIN_CALLS if quick else MIN_CALLS
    shapes = QUICK_SHAPES if quick else FULL_SHAPES
    runs = [(shape, 1) for shape in shapes] + ([] if quick else [(BATCH8_SHAPE, 8)])
    sessions = _OrtSessions(os.cpu_count() or 1)
    rng = np.random.default_rng(0)
    report = {"machine": _machine(tvm, cold_bytes), "results": []}
    progress(
        f"cold rotation {cold_bytes / 1e9:.2f} GB per implementation; median ms per call; "
        f"x = speedup; ideal = dense bytes / bytes read"
    )
    progress(_header())

    for (k, n), m in runs:
        dense_weight = _weight(rng, k, n, 0.0, None)
        baselines = _Baselines(sessions, dense_weight, m, cold_bytes)
        if not report["results"]:
            _warm_up(baselines)
        for case in _cases(quick, m):
            result = _measure_case(baselines, case, rng, cold_bytes, min_calls)
            report["results"].append(result)
            progress(_row(result))
            # A case's weight copies are only freed by the cycle collector (TVM's FFI
            # objects take part in reference cycles), and a GB of them per case adds up.
            gc.collect()
        del baselines
        gc.collect()

    if json_path:
        with open(json_path, "w") as f:
            json.dump(report, f, indent=2)
            f.write("\n")
    if plot_path:
        plot_kernel_bench(report, plot_path)
    return report


KIND_COLORS = {"dense": "0.6", "sparse": "tab:blue", "gated": "tab:orange", "dual": "tab:green"}


def plot_kernel_bench(report: dict, path: str, baseline: str = "onnxruntime") -> None:
    """Writes a PNG: speedup over ``baseline`` (a result's ``speedup_vs_<baseline>``) per
    case, one panel per shape and batch, with the ideal (bytes-moved) speedup marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[tuple, list[dict]] = {}
    for r in report["results"]:
        groups.setdefault((tuple(r["shape"]), r["batch"]), []).append(r)
    fig, axes = plt.subplots(len(groups), 1, figsize=(13, 3.6 * len(groups)), squeeze=False)
    for ax, ((shape, batch), results) in zip(axes[:, 0], groups.items()):
        labels = [
            f"{r['format']}\nw{round(100 * r['weight_sparsity'])} a{round(100 * r['activation_sparsity'])}"
            + ("\nblocks" if r["weight_blocks"] else "")
            for r in results
        ]
        positions = np.arange(len(results))
        for kind, color in KIND_COLORS.items():
            chosen = [i for i, r in enumerate(results) if r["kernel"] == kind]
            if chosen:
                ax.bar(
                    positions[chosen],
                    [results[i][f"speedup_vs_{baseline}"] for i in chosen],
                    color=color,
                    label=kind,
                )
        ax.scatter(
            positions,
            [r["ideal_speedup"] for r in results],
            marker="_",
            s=300,
            color="black",
            zorder=3,
            label="ideal (bytes)",
        )
        ax.axhline(1.0, color="red", linewidth=0.8)
        ax.set_xticks(positions, labels, fontsize=7)
        ax.set_yscale("log")
        ax.set_ylabel(f"speedup vs {baseline}")
        ax.set_title(f"K x N = {shape[0]} x {shape[1]}, batch {batch}")
        ax.legend(fontsize=7, loc="upper left")
    machine = report["machine"]
    where = machine["gpu"] if "gpu" in machine else f"{machine['cpu']}, {machine['cores']} cores"
    fig.suptitle(f"{where}, cold weights")
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.3 / fig.get_figheight()))  # room for the title
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- CUDA (``sparsecc bench kernels --target cuda``) -------------------------------------
#
# The same cases, timed on the GPU against a dense TVM matmul scheduled by dlight's GPU
# rules (GEMV, Matmul, Fallback; see ``dense_cuda_module``) and, where torch sees the GPU,
# torch.matmul. Each call is
# timed on its own by ``time_evaluator`` (CUDA events) after a device-to-device copy of
# ``CUDA_FLUSH_BYTES`` has pushed the weights out of L2, so every call reads them from HBM.
# The kernels' results are checked against numpy first, on the GPU. This path has not been
# run on a GPU in this repository yet: its timings and the goals below are unverified.

CUDA_FULL_SHAPES = FULL_SHAPES + ((8192, 28672),)
CUDA_QUICK_SHAPES = ((2048, 5632), (4096, 11008))
#: Batch-8 cases run on this shape only (full run).
CUDA_BATCH8_SHAPE = (4096, 11008)
#: Bytes copied on the device before each timed call: several times the largest L2 of the
#: GPUs in question (40 MB on A100, 50 MB on H100 and H200).
CUDA_FLUSH_BYTES = 256 * 1024 * 1024
CUDA_REPEATS = 50
QUICK_CUDA_REPEATS = 20
#: The sparsecc goals on the GPU, as (kernel, weight sparsity, blocks?, activation
#: sparsity, speedup over the dense dlight kernel that the case must reach).
CUDA_GOALS = (
    ("gated", 0.0, False, 0.5, 1.6),
    ("sparse", 0.7, False, 0.0, 1.4),
    ("sparse", 0.9, True, 0.0, 4.0),
)
_FLUSH_FUNC = "sparsecc.bench_kernels.flush_l2"


def _cuda_device():
    """The first CUDA device, or a SparseccError when there is none."""
    import tvm

    from runtime.errors import SparseccError

    device = tvm.cuda(0)
    if not device.exist:
        raise SparseccError(
            "no CUDA device was found; run 'sparsecc bench kernels --target cuda' on a machine "
            "with an NVIDIA GPU and its driver, or use --target cpu."
        )
    return device


def _cuda_cases(m: int):
    """(kernel kind, weight sparsity, block or None, activation sparsity, format)."""
    cases = [("dense", 0.0, None, 0.0, "dense")]
    cases += [("sparse", s, None, 0.0, "csr") for s in WEIGHT_SPARSITIES]
    cases += [("sparse", s, BENCH_BLOCK, 0.0, "bsr") for s in WEIGHT_SPARSITIES]
    cases += [("gated", 0.0, None, a, "dense") for a in ACTIVATION_SPARSITIES]
    cases.append(("dual", 0.5, None, 0.5, "dual-bitmask32"))
    if m > 1:
        keep = {("dense", 0.0), ("sparse", 0.7), ("sparse", 0.9), ("gated", 0.0), ("dual", 0.5)}
        cases = [c for c in cases if (c[0], c[1]) in keep and (c[0] != "gated" or c[3] == 0.5)]
    return cases


class _CudaTimer:
    """Times one call at a time on the GPU, with L2 flushed before each."""

    def __init__(self, device):
        import tvm
        import tvm_ffi

        self.device = device
        floats = CUDA_FLUSH_BYTES // 4
        source = tvm.runtime.tensor(np.ones(floats, np.float32), device)
        target = tvm.runtime.tensor(np.zeros(floats, np.float32), device)

        def flush(*_args) -> None:
            # time_evaluator calls this by name before each repeat, with the timed call's
            # arguments; it must return nothing, as its result is the one the timed call
            # then reports into.
            source.copyto(target)

        tvm_ffi.register_global_func(_FLUSH_FUNC, flush, override=True)
        self._keep = (source, target, flush)

    def median_ms(self, module, symbol: str, args, repeats: int) -> float:
        evaluator = module.time_evaluator(
            symbol, self.device, number=1, repeat=repeats, f_preproc=_FLUSH_FUNC
        )
        return statistics.median(evaluator(*args).results) * 1e3


def _torch_ms(weight: np.ndarray, x: np.ndarray, repeats: int):
    """torch.matmul's median ms on the GPU with L2 flushed before each call, or None
    when torch is missing or does not see a CUDA device."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    w = torch.from_numpy(weight).cuda()
    xs = torch.from_numpy(x).cuda()
    out = torch.empty((x.shape[0], weight.shape[1]), device="cuda")
    flush = torch.empty(CUDA_FLUSH_BYTES // 4, device="cuda")
    torch.matmul(xs, w, out=out)
    times = []
    for _ in range(repeats):
        flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        torch.matmul(xs, w, out=out)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    _check("torch.matmul", out.cpu().numpy(), x.astype(np.float64) @ weight.astype(np.float64))
    return statistics.median(times)


def dense_cuda_module(m: int, k: int, n: int, target):
    """``y = x @ W`` as ``x [m, k]`` times ``W^T [n, k]`` (fp32), scheduled by dlight's GPU
    rules and built; returns ``(module, symbol)``.

    The weight is passed transposed (torch's [out, in]) because that is the layout dlight
    schedules well: with the reduction innermost, ``dl.gpu.GEMV`` makes an rfactor GEMV
    with a shared-memory reduction (batch 1) and ``dl.gpu.Matmul`` a tiled matmul (batch
    8), while for ``W [k, n]`` only ``Fallback`` applies, one thread per output and a few
    thread blocks in all, which would be no fair baseline.
    """
    import tvm
    from tvm import te
    from tvm.s_tir import dlight as dl

    x = te.placeholder((m, k), "float32", name="x")
    w_t = te.placeholder((n, k), "float32", name="w_t")
    r = te.reduce_axis((0, k), name="r")
    y = te.compute((m, n), lambda i, j: te.sum(x[i, r] * w_t[j, r], axis=r), name="y")
    func = te.create_prim_func([x, w_t, y]).with_attr("global_symbol", "dense_matmul")
    with target:
        mod = dl.ApplyDefaultSchedule(dl.gpu.GEMV(), dl.gpu.Matmul(), dl.gpu.Fallback())(
            tvm.IRModule({"dense_matmul": func})
        )
    return tvm.compile(mod, target=target).mod, "dense_matmul"


def cuda_case_kernel(case, weight: np.ndarray, x: np.ndarray, target):
    """(module, symbol, weight arrays, bytes read) of one sparse, gated or dual case."""
    import tvm

    import targets.cuda.sparse_kernels as sk

    kind, _, block, _, fmt = case
    m, k = x.shape
    n = weight.shape[1]
    layout = {"sparse": fmt, "gated": "dense"}.get(kind, "bitmask_words")
    arrays = formats.get(layout).encode(weight, block)
    facts = formats.get(layout).facts("cuda", "matmul" if kind == "sparse" else "gated", m, k, n, arrays, block,
                                      per_channel=False)
    if kind == "sparse" and fmt == "csr":
        func = sk.csr_matmul_func(m, k, n, facts.nnz, facts.index_dtype)
    elif kind == "sparse":
        func = sk.bsr_matmul_func(m, k, n, block, facts.nnz, facts.index_dtype)
    elif kind == "gated":
        func = sk.gated_matmul_func(m, k, n, per_channel=False)
    else:
        func = sk.dual_matmul_func(m, k, n, facts.nnz, per_channel=False)
    moved = _moved(layout, weight, arrays, None if kind == "sparse" else _active_rows(x))
    symbol = str(func.attrs["global_symbol"])
    return tvm.compile(tvm.IRModule({symbol: func}), target=target).mod, symbol, arrays, moved


def _cuda_run(module, symbol, args, device, m, n) -> np.ndarray:
    import tvm

    y = tvm.runtime.tensor(np.full((m, n), np.nan, np.float32), device)
    module[symbol](*args, y)
    return y.numpy()


def _measure_cuda_case(timer, dense, case, rng, k, n, m, target, repeats, torch_ms) -> dict:
    """Builds, checks and times one case on the GPU against the dense kernel."""
    import tvm

    device = timer.device
    kind, w_sparsity, block, a_sparsity, fmt = case
    weight = _weight(rng, k, n, w_sparsity, block)
    x = _activations(rng, m, k, a_sparsity)
    gated = kind in ("gated", "dual")
    x_in = np.where(np.abs(x) > GATE_THRESHOLD, x, 0).astype(np.float32) if gated else x
    expected = x_in.astype(np.float64) @ weight.astype(np.float64)

    dense_module, dense_symbol = dense
    dense_args = [tvm.runtime.tensor(a, device) for a in (x_in, np.ascontiguousarray(weight.T))]
    _check("dense dlight kernel", _cuda_run(dense_module, dense_symbol, dense_args, device, m, n), expected)
    y = tvm.runtime.tensor(np.zeros((m, n), np.float32), device)
    dense_ms = timer.median_ms(dense_module, dense_symbol, [*dense_args, y], repeats)
    if kind == "dense":
        module, symbol, args, moved, label = dense_module, dense_symbol, dense_args, 4 * k * n, "dense"
    else:
        module, symbol, arrays, moved = cuda_case_kernel(case, weight, x, target)
        lead = [x] + ([np.array([GATE_THRESHOLD], np.float32)] if gated else [])
        args = [tvm.runtime.tensor(a, device) for a in (*lead, *arrays)]
        label = _format_label(fmt, block) if kind == "sparse" else ("dense+gate" if kind == "gated" else fmt)
        _check(f"{kind} {label}", _cuda_run(module, symbol, args, device, m, n), expected)
    ms = timer.median_ms(module, symbol, [*args, y], repeats)
    return _result(
        case, label, k, n, m, block, ms, moved,
        dense_ms=dense_ms,
        torch_ms=torch_ms,
        speedup_vs_dense=dense_ms / ms,
        speedup_vs_torch=torch_ms / ms if torch_ms else None,
    )


def _cuda_goals(results: list[dict]) -> list[dict]:
    goals = []
    for kind, w_sparsity, blocks, a_sparsity, wanted in CUDA_GOALS:
        for r in results:
            if (r["kernel"], r["weight_sparsity"], r["weight_blocks"] is not None,
                    r["activation_sparsity"]) == (kind, w_sparsity, blocks, a_sparsity):
                goals.append({
                    "case": f"{kind} {r['format']} w{round(100 * w_sparsity)} a{round(100 * a_sparsity)}",
                    "shape": r["shape"],
                    "batch": r["batch"],
                    "goal_speedup_vs_dense": wanted,
                    "speedup_vs_dense": r["speedup_vs_dense"],
                    "met": r["speedup_vs_dense"] >= wanted,
                })
    return goals


def _cuda_header() -> str:
    return (
        f"{'K x N':>11} {'M':>2} {'kernel':>6} {'format':>14} {'w%':>3} {'a%':>3} "
        f"{'ours ms':>8} {'dense':>7} {'torch':>7} {'xdense':>6} {'xtorch':>6} {'ideal':>5}"
    )


def _cuda_row(r: dict) -> str:
    k, n = r["shape"]
    torch_ms = f"{r['torch_ms']:>7.3f}" if r["torch_ms"] else f"{'-':>7}"
    vs_torch = f"{r['speedup_vs_torch']:>6.2f}" if r["speedup_vs_torch"] else f"{'-':>6}"
    return (
        f"{f'{k}x{n}':>11} {r['batch']:>2} {r['kernel']:>6} {r['format']:>14} "
        f"{round(100 * r['weight_sparsity']):>3} {round(100 * r['activation_sparsity']):>3} "
        f"{r['ms']:>8.4f} {r['dense_ms']:>7.4f} {torch_ms} {r['speedup_vs_dense']:>6.2f} "
        f"{vs_torch} {r['ideal_speedup']:>5.2f}"
    )


def run_cuda_kernel_bench(
    quick: bool, json_path: str | None, plot_path: str | None, progress=print
) -> dict:
    """Runs the kernel benchmark on the first CUDA device (see ``run_kernel_bench``).

    Returns:
        ``{"machine": {...}, "results": [...], "goals": [...]}``: results as the CPU
        benchmark's, with ``torch_ms`` and ``speedup_vs_torch`` (None without torch on
        the GPU) in place of the onnxruntime and numpy columns; each goal names a case,
        its shape and batch, the speedup over the dense kernel it must reach and whether
        it did.

    Raises:
        SparseccError: when no CUDA device is found (before anything is built or
            written).
    """
    device = _cuda_device()
    import tvm

    from targets.cuda.codegen import cuda_target, use_nvcc_without_nvrtc

    use_nvcc_without_nvrtc()
    target = cuda_target("sm_" + device.compute_version.replace(".", ""))
    repeats = QUICK_CUDA_REPEATS if quick else CUDA_REPEATS
    shapes = CUDA_QUICK_SHAPES if quick else CUDA_FULL_SHAPES
    runs = [(shape, 1) for shape in shapes] + ([] if quick else [(CUDA_BATCH8_SHAPE, 8)])
    timer = _CudaTimer(device)
    rng = np.random.default_rng(0)
    report = {
        "machine": {
            "gpu": device.device_name,
            "compute_version": device.compute_version,
            "target": str(target),
            "tvm": tvm.__version__,
            "flush_bytes": CUDA_FLUSH_BYTES,
            "repeats": repeats,
        },
        "results": [],
    }
    progress(f"L2 flushed ({CUDA_FLUSH_BYTES >> 20} MB) before each call; median ms of {repeats}")
    progress(_cuda_header())
    for (k, n), m in runs:
        dense = dense_cuda_module(m, k, n, target)
        torch_ms = _torch_ms(_weight(rng, k, n, 0.0, None), _activations(rng, m, k, 0.0), repeats)
        for case in _cuda_cases(m):
            result = _measure_cuda_case(timer, dense, case, rng, k, n, m, target, repeats, torch_ms)
            report["results"].append(result)
            progress(_cuda_row(result))
            gc.collect()
    report["goals"] = _cuda_goals(report["results"])
    for goal in report["goals"]:
        progress(
            f"goal {goal['case']} {goal['shape'][0]}x{goal['shape'][1]} batch {goal['batch']}: "
            f"{goal['speedup_vs_dense']:.2f}x dense (goal {goal['goal_speedup_vs_dense']}x) "
            f"{'met' if goal['met'] else 'NOT met'}"
        )
    if json_path:
        with open(json_path, "w") as f:
            json.dump(report, f, indent=2)
            f.write("\n")
    if plot_path:
        plot_kernel_bench(report, plot_path, baseline="dense")
    return report
