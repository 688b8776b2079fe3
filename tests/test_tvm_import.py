"""``targets.tvm_import``: a legalized model's kernel ops become calls of the target's
kernel table (``KERNELS``).

The models are written as ONNX text: ``x`` [M, K] and, per op, the arrays legalisation
lifts to graph inputs, with a CpuSparseMatMul in each weight format and a CpuGatedMatMul
in each ``dual`` mode (and the CUDA ops the CUDA table has). Three checks:

- dispatch: the imported module holds exactly the PrimFuncs that the format's builder
  gives for the facts of each op (its sizes, stored count, index dtype, block and threshold
  shape), each once however many ops share it;
- numbers: the CPU module, built for the host, computes every ``x @ W`` (or
  ``gate(x) @ W``) of a float64 numpy reference within ``rtol = atol = 1e-5``, the
  tolerance of ``test_sparse_kernels.py`` (fp32 sums of K = 64 terms in another order);
- a weight layout the target has no kernel for is one SparseccError naming the layouts it
  has.
"""

from __future__ import annotations

import os

os.environ.setdefault("TVM_NUM_THREADS", str(os.cpu_count() or 1))

import numpy as np
import onnx
import pytest

from passes.sparse_formats import encode
from runtime.errors import SparseccError
from targets.cpu import legalize as cpu_legalize, lower as cpu_lower, sparse_kernels as cpu_kernels
from targets.cuda import legalize as cuda_legalize, lower as cuda_lower, sparse_kernels as cuda_kernels
from targets.legalize import DUAL_BITMASK, DUAL_NONE, DUAL_SEGMENTS

RTOL = 1e-5
ATOL = 1e-5
M, K, N = 2, 64, 48
BLOCK = (16, 1)

_NP_TYPES = {np.dtype("float32"): "float", np.dtype("int32"): "int32", np.dtype("int16"): "int16",
             np.dtype("uint8"): "uint8", np.dtype("uint32"): "uint32"}


def _weight(seed: int, block=None) -> np.ndarray:
    """A [K, N] weight, about 60 % zeros (in blocks of W^T when ``block`` is given)."""
    rng = np.random.default_rng(seed)
    weight = (rng.standard_normal((K, N)) / np.sqrt(K)).astype(np.float32)
    if block is None:
        return weight * (rng.random((K, N)) > 0.6)
    r, c = block
    keep = np.repeat(np.repeat(rng.random((N // r, K // c)) > 0.6, r, axis=0), c, axis=1)
    return weight * keep.T


class _Model:
    """An ONNX text model being written: graph inputs with their arrays, and nodes."""

    def __init__(self, domain: str):
        self.domain = domain
        self.inputs = {"x": np.random.default_rng(9).standard_normal((M, K)).astype(np.float32)}
        self.nodes: list[str] = []
        self.outputs: list[str] = []

    def add(self, op: str, name: str, arrays: list[np.ndarray], attrs: str, gated_input: str | None = None):
        names = [f"{name}_{i}" for i in range(len(arrays))]
        self.inputs.update(zip(names, arrays))
        operands = ", ".join(["x", *([gated_input] if gated_input else []), *names])
        self.nodes.append(f"y_{name} = {self.domain}.{op} <{attrs}> ({operands})")
        self.outputs.append(f"y_{name}")

    def threshold(self, name: str, values: np.ndarray) -> str:
        self.inputs[name] = values
        return name

    def onnx(self) -> onnx.ModelProto:
        inputs = ", ".join(f"{_NP_TYPES[a.dtype]}[{', '.join(map(str, a.shape))}] {n}" for n, a in self.inputs.items())
        outputs = ", ".join(f"float[{M}, {N}] {name}" for name in self.outputs)
        body = "\n    ".join(self.nodes)
        return onnx.parser.parse_model(f"""
            <ir_version: 8, opset_import: ["": 17, "{self.domain}": 1]>
            legalized ({inputs}) => ({outputs})
            {{
                {body}
            }}
        """)

    def import_with(self, lower):
        shapes = {name: list(array.shape) for name, array in self.inputs.items()}
        dtypes = {name: array.dtype.name for name, array in self.inputs.items()}
        return lower.import_onnx(self.onnx(), shapes, dtypes)


def _cpu_model():
    """Every CPU layout once (csr twice, to show one PrimFunc serves both), and the numpy
    result of each op."""
    model, expected = _Model(cpu_legalize.DOMAIN), {}
    x = model.inputs["x"]
    sparse = cpu_legalize.SPARSE_MATMUL
    for name, format, block, seed in (("csr", "csr", None, 0), ("csr_again", "csr", None, 0),
                                      ("bsr", "bsr", BLOCK, 1), ("bitmask", "bitmask", None, 2)):
        weight = _weight(seed, block)
        attrs = f'format = "{format}", k = {K}, n = {N}' + (f", block = [{block[0]}, {block[1]}]" if block else "")
        model.add(sparse, name, encode(weight, format, block) if block else encode(weight, format), attrs)
        expected[name] = x.astype(np.float64) @ weight
    # Thresholds: per input channel for gated and segments, one for dual.
    channel = model.threshold("per_channel", np.abs(np.random.default_rng(5).standard_normal(K)).astype(np.float32))
    scalar = model.threshold("scalar", np.array([0.7], np.float32))
    gated = cpu_legalize.GATED_MATMUL
    for name, dual, pack, threshold, seed in (
        ("gated", DUAL_NONE, lambda w: [w], channel, 3),
        ("dual", DUAL_BITMASK, cpu_kernels.pack_dual_weight, scalar, 4),
        ("segments", DUAL_SEGMENTS, cpu_kernels.pack_segment_weight, channel, 5),
    ):
        weight = _weight(seed, BLOCK)
        model.add(gated, name, pack(weight), f"k = {K}, n = {N}, dual = {dual}", gated_input=threshold)
        gate = np.where(np.abs(x) > model.inputs[threshold], x, 0).astype(np.float64)
        expected[name] = gate @ weight
    return model, expected


def _symbols(module) -> list[str]:
    from tvm import tirx

    return sorted(str(f.attrs["global_symbol"]) for _, f in module.functions.items() if isinstance(f, tirx.PrimFunc))


def _symbol(func) -> str:
    return str(func.attrs["global_symbol"])


def test_cpu_ops_call_the_builder_of_their_layout_once_per_shape():
    model, _ = _cpu_model()
    arrays = model.inputs
    expected = sorted([
        _symbol(cpu_kernels.csr_matmul_func(M, K, N, arrays["csr_2"].size, "int16")),
        _symbol(cpu_kernels.bsr_matmul_func(M, K, N, BLOCK, arrays["bsr_1"].size, "int16")),
        _symbol(cpu_kernels.bitmask_matmul_func(M, K, N, arrays["bitmask_2"].size)),
        _symbol(cpu_kernels.gated_matmul_func(M, K, N, True)),
        _symbol(cpu_kernels.dual_matmul_func(M, K, N, arrays["dual_2"].size, False)),
        _symbol(cpu_kernels.segment_matmul_func(M, K, N, arrays["segments_1"].size, True)),
    ])
    assert _symbols(model.import_with(cpu_lower)) == expected


def test_cpu_module_computes_every_op():
    import tvm
    from tvm import relax

    from targets.cpu.host import host_target
    from targets.cpu.target import relax_pipeline

    model, expected = _cpu_model()
    target = host_target()
    executable = tvm.compile(model.import_with(cpu_lower), target=target, relax_pipeline=relax_pipeline(target))
    vm = relax.VirtualMachine(executable, tvm.cpu())
    outputs = vm["main"](*[tvm.runtime.tensor(array) for array in model.inputs.values()])
    assert len(outputs) == len(expected)
    for (name, reference), output in zip(expected.items(), outputs):
        np.testing.assert_allclose(output.numpy(), reference, rtol=RTOL, atol=ATOL, err_msg=name)


def test_cuda_ops_call_the_builder_of_their_layout():
    model = _Model(cuda_legalize.DOMAIN)
    weight = _weight(0, BLOCK)
    csr, bsr = encode(weight, "csr"), encode(weight, "bsr", BLOCK)
    model.add(cuda_legalize.SPARSE_MATMUL, "csr", csr, f'format = "csr", k = {K}, n = {N}')
    model.add(cuda_legalize.SPARSE_MATMUL, "bsr", bsr, f'format = "bsr", k = {K}, n = {N}, block = [16, 1]')
    threshold = model.threshold("scalar", np.array([0.5], np.float32))
    dual = cuda_kernels.pack_dual_weight(weight)
    model.add(cuda_legalize.GATED_MATMUL, "gated", [weight], f"k = {K}, n = {N}, dual = {DUAL_NONE}", threshold)
    model.add(cuda_legalize.GATED_MATMUL, "dual", dual, f"k = {K}, n = {N}, dual = {DUAL_BITMASK}", threshold)
    assert _symbols(model.import_with(cuda_lower)) == sorted([
        _symbol(cuda_kernels.csr_matmul_func(M, K, N, csr[2].size, "int16")),
        _symbol(cuda_kernels.bsr_matmul_func(M, K, N, BLOCK, bsr[1].size, "int16")),
        _symbol(cuda_kernels.gated_matmul_func(M, K, N, False)),
        _symbol(cuda_kernels.dual_matmul_func(M, K, N, dual[2].size, False)),
    ])


@pytest.mark.parametrize("lower,legalize,op,attrs,message", [
    (cpu_lower, cpu_legalize, "SPARSE_MATMUL", 'format = "coo"', "'coo' layout on this target (it has bitmask, bsr, csr)"),
    (cuda_lower, cuda_legalize, "SPARSE_MATMUL", 'format = "bitmask"', "'bitmask' layout on this target (it has bsr, csr)"),
    (cpu_lower, cpu_legalize, "GATED_MATMUL", "dual = 7", "'dual=7' layout on this target (it has dual, gated, segments)"),
])
def test_a_layout_without_a_kernel_is_one_clear_error(lower, legalize, op, attrs, message):
    model = _Model(legalize.DOMAIN)
    model.add(getattr(legalize, op), "w", [np.ones((K, N), np.float32)], f"{attrs}, k = {K}, n = {N}",
              gated_input=model.threshold("t", np.zeros(1, np.float32)) if op == "GATED_MATMUL" else None)
    with pytest.raises(SparseccError) as error:
        model.import_with(lower)
    assert str(error.value) == f"{getattr(legalize, op)} has no kernel for weights in the {message}."
