"""The CPU target: legalize (ONNX), lower (Relax), build (LLVM shared library + weights).

``compile_for_host`` and ``build`` are functions so that the targets that also run on the
host (``neuro``'s controllers, the host-simulated cuda target of the tests) call them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import onnx

from runtime.tvm_runtime import isa_flags
from targets.base import LIBRARY, WEIGHTS, Lowered, lower_onnx, write_weights
from targets.cpu import legalize as cpu_legalize
from targets.cpu.host import host_cpu_name, host_target


def relax_pipeline(target):
    """The Relax pipeline: TVM's CPU phases with our schedules between them."""
    import tvm
    from tvm import relax
    from tvm.relax.backend.cpu_generic import pipeline as cpu_generic

    from targets.cpu.schedule import schedule_pass

    @tvm.transform.module_pass(opt_level=0, name="SparseccCpuPipeline")
    def _pipeline(mod, _ctx):
        with target:
            phases = (
                # Library dispatch and operator legalisation: Relax ops become TIR.
                cpu_generic.library_dispatch_passes(target)
                + cpu_generic.legalize_passes(target)
                # Schedules: parallel, vectorised loops for what TVM leaves plain.
                + [schedule_pass()]
                # Dataflow lowering and memory planning, as TVM does them.
                + cpu_generic.dataflow_lower_passes(target)
                + cpu_generic.finalize_passes(target)
            )
            return tvm.transform.Sequential(phases)(mod)

    return _pipeline


def compile_for_host(module, staging: Path, dump: Callable[[str, str], None] | None = None):
    """Builds the Relax ``module`` for this CPU (TVM's CPU phases with our schedules) into
    ``staging / LIBRARY``; returns the LLVM target it was built for."""
    import tvm

    target = host_target()
    executable = tvm.compile(module, target=target, relax_pipeline=relax_pipeline(target))
    if dump:
        dump("host-code.ll", executable.mod.imports[0].inspect_source("ll") if executable.mod.imports else "")
    executable.export_library(str(staging / LIBRARY))
    return target


def build(lowered: Lowered, staging: Path, dump: Callable[[str, str], None] | None = None) -> dict:
    """The library and the weights of a ``cpu`` artifact; returns the build's entries."""
    target = compile_for_host(lowered.module, staging, dump)
    entries = write_weights(staging / WEIGHTS, lowered.weights)
    return {"weights": entries, "library": LIBRARY, "weights_file": WEIGHTS, "target": {
        "name": "cpu",
        "mcpu": host_cpu_name(),
        "isa": isa_flags(),
        "llvm_target": str(target),
        "num_threads": int(os.environ.get("TVM_NUM_THREADS", os.cpu_count() or 1)),
    }}


class CpuTarget:
    """Compiles for the host CPU with its own ``mcpu`` and all cores."""

    name = "cpu"
    #: The kernel efficiencies the graph passes choose formats with.
    costs = cpu_legalize.COSTS

    def unsupported_ops(self, model: onnx.ModelProto) -> list[str]:
        from targets.cpu.lower import unsupported_ops

        return unsupported_ops(model)

    def legalize(self, model: onnx.ModelProto):
        return cpu_legalize.legalize(model)

    def lower(self, model: onnx.ModelProto, weights, input_shapes: dict[str, list[int]],
              dump: Callable[[str, str], None] | None = None) -> Lowered:
        from targets.cpu.lower import import_onnx

        return lower_onnx(import_onnx, model, weights, input_shapes, dump)

    def build(self, lowered: Lowered, staging: Path, dump: Callable[[str, str], None] | None = None) -> dict:
        return build(lowered, staging, dump)
