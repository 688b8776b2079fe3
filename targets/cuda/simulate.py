"""The cuda target's program built for the host CPU, to check its numbers without a GPU.

``HostSimulatedCudaTarget`` legalizes and lowers exactly as ``CudaTarget`` does (the same
graph rewrites, the same weight layouts, the same TIR of our CUDA kernels), then builds
for the host: our kernels with their thread-bound loops made serial
(``sparse_kernels.serial_copy``, which computes what the GPU computes because each kernel
runs its phases as consecutive thread-bound loops), TVM's operators with the CPU
schedules. The result is an ordinary CPU artifact that the tests compare with
onnxruntime. What it does not check: dlight's GPU schedules, CUDA code generation and
the GPU itself (the ``gpu``-marked tests do, where a GPU is present).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from targets.base import Lowered
from targets.cpu.target import build as build_for_cpu
from targets.cuda.sparse_kernels import serial_copy
from targets.cuda.target import CudaTarget


def serial_kernels(module):
    """``module`` with every one of our CUDA kernels replaced by its serial copy."""
    from tvm import tirx

    for gvar, function in list(module.functions_items()):
        if isinstance(function, tirx.PrimFunc) and gvar.name_hint.startswith("cuda_"):
            module[gvar] = serial_copy(function)
    return module


class HostSimulatedCudaTarget(CudaTarget):
    """``CudaTarget`` up to the build, which is for the host CPU (a ``cpu`` artifact)."""

    def build(self, lowered: Lowered, staging: Path, dump: Callable[[str, str], None] | None = None) -> dict:
        built = build_for_cpu(Lowered(serial_kernels(lowered.module), lowered.weights, lowered.explanations), staging, dump)
        built["target"]["simulates"] = f"cuda:{self.arch}"
        return built
