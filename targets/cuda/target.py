"""The CUDA target: legalize (ONNX), lower (Relax), build (CUDA kernels + host code + weights).

Dense operators are scheduled by TVM's dlight GPU rules (``Matmul``, ``GEMV``,
``Reduction``, ``GeneralReduction``, ``Fallback``: TVM's own CUDA pipeline); every
``ai.sparsecc`` operator of a decode-sized matmul is one of our kernels
(``targets.cuda.sparse_kernels``), already thread-bound, which dlight leaves as they are.

The artifact's ``model.so`` holds the host code (the Relax VM's program, built by LLVM
for this machine's processor family, without CPU-specific instructions) and the CUDA C
source of every kernel; TVM's runtime compiles that source when the library is loaded on
a machine with a GPU (NVRTC, or nvcc with ``TVM_CUDA_COMPILE_MODE=nvcc``). ``kernels.cu``
is the same source, for reading and for ``nvcc``. The manifest's ``target`` records the
architecture, each kernel's threads per block and shared memory, and each compiled
operator's bytes and FLOPs, from which ``sparsecc profile`` estimates latency on GPU
hardware models without a GPU.
"""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Callable

import onnx

import formats
from runtime.errors import SparseccError
from targets.base import LIBRARY, WEIGHTS, Lowered, lower_onnx, write_weights
from targets.cuda import legalize as cuda_legalize
from targets.cuda.codegen import cuda_sources, cuda_target, kernel_report, within_limits

SOURCE = "kernels.cu"
DEFAULT_ARCH = "sm_80"
#: Architectures ``-t cuda:ARCH`` accepts: A100 (sm_80), Jetson Orin (sm_87), H100 (sm_90).
ARCHS = ("sm_80", "sm_87", "sm_90")


def _static_bytes(ty) -> int:
    import numpy as np

    shape = getattr(ty, "shape", None)
    values = getattr(shape, "values", None)
    if values is None or any(not hasattr(v, "value") for v in values):
        return 0
    return int(np.prod([int(v.value) for v in values])) * np.dtype(str(ty.dtype)).itemsize


def _our_kernel_flops(name: str) -> tuple[str | None, float | None]:
    """(kind, multiply-add FLOPs) of one of our sparse kernels from the facts its global
    symbol spells out (``formats.parse_symbol``): 2 m per stored weight (a bsr block is
    R x C of them), 2 m k n for the gated kernel (all inputs active); kind ``gated`` or
    ``dual`` for the gated kernels over a dense or a dual-sparse weight, else the format;
    (None, None) for any other function."""
    facts = formats.parse_symbol(name)
    if facts is None or facts.target != "cuda":
        return None, None
    kind = ("gated" if facts.format == "dense" else "dual") if facts.role == "gated" else facts.format
    return kind, formats.get(facts.format).flops(facts)


def operator_costs(mod, records: list[dict]) -> None:
    """Appends to ``records`` one entry per ``call_tir`` in ``main``: the kernel's name and
    kind (``csr``, ``bsr``, ``gated``, ``dual`` for ours, ``tvm`` for the rest), the bytes
    of its tensor arguments and result (a row gather: the rows it reads), and its FLOPs
    (ours from their shapes, the rest TVM's estimate). Functions that only reshape become
    views of their input and are left out."""
    import tvm
    from tvm import relax
    from tvm.s_tir.analysis import estimate_tir_flops

    flops: dict[str, float] = {}
    views = set()
    for gvar, function in mod.functions.items():
        if isinstance(function, relax.Function):
            continue
        scheduled = function.attrs is not None and "tirx.is_scheduled" in function.attrs
        if not scheduled and relax.analysis.has_reshape_pattern(function):
            views.add(gvar.name_hint)  # becomes a view of its input, not a kernel
        try:
            flops[gvar.name_hint] = float(estimate_tir_flops(tvm.IRModule({"main": function})))
        except Exception:  # some TIR (external calls) has no estimate; count none
            flops[gvar.name_hint] = 0.0
    call_tir = relax.op.get("relax.call_tir") if hasattr(relax.op, "get") else None

    def visit(expr):
        if isinstance(expr, relax.Call) and (call_tir is None or expr.op.same_as(call_tir)) and len(expr.args) >= 2 \
                and isinstance(expr.args[0], relax.GlobalVar):
            name = expr.args[0].name_hint
            if name in views:
                return
            args = expr.args[1].fields if isinstance(expr.args[1], relax.Tuple) else [expr.args[1]]
            sizes = [_static_bytes(arg.ty) for arg in args]
            if name.startswith("take"):
                sizes[0] = _static_bytes(expr.ty)  # a row gather reads the rows it returns
            nbytes = sum(sizes) + _static_bytes(expr.ty)
            kind, exact = _our_kernel_flops(name)
            record = {"name": name, "kind": kind or "tvm", "bytes": nbytes,
                      "flops": exact if exact is not None else flops.get(name, 0.0)}
            if kind in ("gated", "dual"):
                # Operands x, threshold, weight arrays..., then the result.
                record["weight_bytes"] = sum(sizes[2:])
            records.append(record)

    relax.analysis.post_order_visit(mod["main"], visit)


def schedule_pass():
    """dlight's GPU rules (TVM's CUDA default: Matmul, GEMV, Reduction, GeneralReduction,
    Fallback) on every PrimFunc not scheduled yet; a rule that fails on a function (GEMV
    asserts on a reduction of extent 1, as attention over a one-token cache makes) passes
    it on to the next rule instead of failing the build."""
    import tvm
    from tvm import tirx
    from tvm.s_tir import dlight as dl

    rules = [dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(), dl.gpu.GeneralReduction(), dl.gpu.Fallback()]

    @tvm.transform.module_pass(opt_level=0, name="SparseccCudaSchedule")
    def _schedule(mod, _ctx):
        target = tvm.target.Target.current(allow_none=False)
        updated = {}
        for gvar, func in mod.functions_items():
            if not isinstance(func, tirx.PrimFunc) or (func.attrs is not None and "tirx.is_scheduled" in func.attrs):
                continue
            for rule in rules:
                try:
                    space = rule.apply(func, target, False)
                except Exception:  # this rule cannot schedule this function; try the next
                    continue
                if space is None:
                    continue
                schedule = space[0] if isinstance(space, list) else space
                updated[gvar] = schedule.mod["main"].with_attr("tirx.is_scheduled", True)
                break
        for gvar, func in updated.items():
            mod[gvar] = func
        return mod

    return _schedule


def relax_pipeline(target, records: list[dict]):
    """TVM's CUDA pipeline, recording each operator's costs after scheduling."""
    import tvm
    from tvm.relax.backend.cuda import pipeline as cuda_pipeline

    @tvm.transform.module_pass(opt_level=0, name="SparseccCostRecord")
    def _record(mod, _ctx):
        operator_costs(mod, records)
        return mod

    @tvm.transform.module_pass(opt_level=0, name="SparseccCudaPipeline")
    def _pipeline(mod, _ctx):
        with target:
            # Costs are read before dlight schedules the kernels (TVM's FLOP estimate
            # does not see through thread bindings); the last phase of TVM's legalisation
            # is its dlight schedule, replaced by ours.
            legalize = cuda_pipeline.legalize_passes(target)
            phases = (cuda_pipeline.library_dispatch_passes(target) + legalize[:-1] + [_record, schedule_pass()]
                      + cuda_pipeline.dataflow_lower_passes(target) + cuda_pipeline.finalize_passes(target))
            return tvm.transform.Sequential(phases)(mod)

    return _pipeline


class CudaTarget:
    """``cuda[:ARCH]``: NVIDIA GPUs of compute capability ``ARCH`` (default sm_80)."""

    name = "cuda"
    #: The kernel efficiencies the graph passes choose formats with (estimates).
    costs = cuda_legalize.COSTS

    def __init__(self, arch: str = DEFAULT_ARCH):
        if arch not in ARCHS:
            raise SparseccError(f"unknown CUDA architecture {arch!r}; choose one of {', '.join(ARCHS)}.")
        self.arch = arch

    def unsupported_ops(self, model: onnx.ModelProto) -> list[str]:
        from targets.cuda.lower import unsupported_ops

        return unsupported_ops(model)

    def legalize(self, model: onnx.ModelProto):
        return cuda_legalize.legalize(model)

    def lower(self, model: onnx.ModelProto, weights, input_shapes: dict[str, list[int]],
              dump: Callable[[str, str], None] | None = None) -> Lowered:
        from targets.cuda.lower import import_onnx

        return lower_onnx(import_onnx, model, weights, input_shapes, dump)

    def build(self, lowered: Lowered, staging: Path, dump: Callable[[str, str], None] | None = None) -> dict:
        import tvm

        target = cuda_target(self.arch, host=True)
        records: list[dict] = []
        executable = tvm.compile(lowered.module, target=target, relax_pipeline=relax_pipeline(target, records))
        source = "\n".join(cuda_sources(executable.mod))
        if not source.strip():
            raise SparseccError("TVM produced no CUDA kernels for this model.")
        kernels = kernel_report(source)
        problems = within_limits(kernels, self.arch)
        if problems:
            raise SparseccError(f"a generated kernel exceeds the limits of {self.arch}: {problems[0]}")
        if dump:
            dump("cuda-kernels.cu", source)
        executable.export_library(str(staging / LIBRARY))
        (staging / SOURCE).write_text(source)
        entries = write_weights(staging / WEIGHTS, lowered.weights)
        return {"weights": entries, "library": LIBRARY, "weights_file": WEIGHTS, "target": {
            "name": self.name,
            "arch": self.arch,
            "host_machine": platform.machine(),
            "source": SOURCE,
            "kernels": kernels,
            "operators": records,
        }}
