"""The ``cuda`` target: TVM Relax with dlight schedules and our TIR kernels, built to CUDA
source that the runtime compiles on a machine with an NVIDIA GPU."""

from targets.cuda.target import ARCHS, DEFAULT_ARCH, CudaTarget


def make_target(arch: str = "", chips: int = 1) -> CudaTarget:
    return CudaTarget(arch or DEFAULT_ARCH)


__all__ = ["ARCHS", "CudaTarget", "make_target"]
