"""The CPU target: legalize (ONNX), lower (Relax), build (LLVM shared library + weights)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import numpy as np
import onnx

from targets.base import Lowered
from targets.cpu import legalize as cpu_legalize
from runtime.tvm_runtime import isa_flags
from targets.cpu.host import host_cpu_name, host_target

LIBRARY = "model.so"
WEIGHTS = "weights.bin"
# Weights start on cache-line boundaries so the kernels' vector loads are aligned.
WEIGHT_ALIGNMENT = 64


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

    def import_onnx(self, model: onnx.ModelProto, shapes: dict[str, list[int]], dtypes: dict[str, str]):
        from targets.cpu.lower import import_onnx

        return import_onnx(model, shapes, dtypes)

    def lower(self, model: onnx.ModelProto, weights, input_shapes: dict[str, list[int]],
              dump: Callable[[str, str], None] | None = None) -> Lowered:
        shapes = dict(input_shapes)
        dtypes = {}
        for value in model.graph.input:
            elem = value.type.tensor_type.elem_type
            dtypes[value.name] = onnx.helper.tensor_dtype_to_np_dtype(elem).name
        for name, array, _ in weights:
            shapes[name] = list(array.shape)
        module = self.import_onnx(model, shapes, dtypes)
        if dump:
            dump("relax-imported.py", module.script())
        return Lowered(module, weights)

    def build(self, lowered: Lowered, staging: Path, dump: Callable[[str, str], None] | None = None) -> dict:
        import tvm

        target = host_target()
        executable = tvm.compile(lowered.module, target=target, relax_pipeline=relax_pipeline(target))
        if dump:
            dump("host-code.ll", executable.mod.imports[0].inspect_source("ll") if executable.mod.imports else "")
        executable.export_library(str(staging / LIBRARY))
        entries = write_weights(staging / WEIGHTS, lowered.weights)
        return {"weights": entries, "library": LIBRARY, "weights_file": WEIGHTS, "target": {
            "name": self.name,
            "mcpu": host_cpu_name(),
            "isa": isa_flags(),
            "llvm_target": str(target),
            "num_threads": int(os.environ.get("TVM_NUM_THREADS", os.cpu_count() or 1)),
        }}


def write_weights(path: Path, weights) -> list[dict]:
    """Writes the weights back to back, aligned; returns their manifest entries."""
    entries = []
    offset = 0
    with open(path, "wb") as handle:
        for name, array, source in weights:
            padding = -offset % WEIGHT_ALIGNMENT
            handle.write(b"\0" * padding)
            offset += padding
            data = np.ascontiguousarray(array)
            handle.write(data.tobytes())
            entries.append({"name": name, "shape": list(data.shape), "dtype": data.dtype.name,
                            "offset": offset, "nbytes": data.nbytes, "source": source})
            offset += data.nbytes
    return entries
