"""The ``cpu`` target: TVM Relax with our TIR kernels, built by LLVM for the host CPU."""

from targets.cpu.target import CpuTarget


def make_target() -> CpuTarget:
    return CpuTarget()


__all__ = ["CpuTarget", "make_target"]
