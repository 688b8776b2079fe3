"""CUDA code generation without a GPU: TIR or Relax to CUDA C source, and source to PTX.

TVM 0.27's ``tvm.compile`` for a ``cuda`` target keeps the kernels as CUDA source inside
the built module (the runtime JIT-compiles them when the module is loaded on a GPU), so
the source can be read on any machine. ``compile_ptx`` runs nvcc on it, which needs the
CUDA toolkit but no device.
"""

from __future__ import annotations

import shutil

from runtime.errors import SparseccError

# Per-block limits from NVIDIA's CUDA C++ Programming Guide, "Technical Specifications per
# Compute Capability" (compute capability 8.0 and 9.0): 1024 threads per block, 48 KB of
# static shared memory per block (more only by dynamic shared memory and an opt-in
# attribute: 163 KB on 8.0, 227 KB on 9.0), and 255 32-bit registers per thread.
ARCH_LIMITS = {
    "sm_80": {
        "max_threads_per_block": 1024,
        "max_static_shared_bytes": 48 * 1024,
        "max_optin_shared_bytes": 163 * 1024,
        "max_registers_per_thread": 255,
    },
    # Jetson Orin (8.7): the same per-block limits as 8.0 in that table.
    "sm_87": {
        "max_threads_per_block": 1024,
        "max_static_shared_bytes": 48 * 1024,
        "max_optin_shared_bytes": 163 * 1024,
        "max_registers_per_thread": 255,
    },
    "sm_90": {
        "max_threads_per_block": 1024,
        "max_static_shared_bytes": 48 * 1024,
        "max_optin_shared_bytes": 227 * 1024,
        "max_registers_per_thread": 255,
    },
}


def cuda_target(arch: str, host: bool = False):
    """The ``tvm.target.Target`` for CUDA on ``arch`` (``"sm_80"``, ``"sm_90"``, ...).

    For an arch in ``ARCH_LIMITS`` the target carries its per-block limits, which dlight
    and TVM's GPU code verifier read (TVM otherwise assumes them, with a warning). With
    ``host``, the host code is for this machine's processor family without CPU-specific
    instructions (a whole model's Relax VM program).
    """
    import tvm

    config = {"kind": "cuda", "arch": arch}
    if arch in ARCH_LIMITS:
        config["max_threads_per_block"] = ARCH_LIMITS[arch]["max_threads_per_block"]
        config["max_shared_memory_per_block"] = ARCH_LIMITS[arch]["max_static_shared_bytes"]
    return tvm.target.Target(config, host={"kind": "llvm"}) if host else tvm.target.Target(config)


def _cuda_modules(module):
    if module.kind == "cuda":
        yield module
    for imported in module.imports:
        yield from _cuda_modules(imported)


def cuda_sources(module) -> list[str]:
    """The CUDA C source of every CUDA module inside a built ``module``."""
    return [m.inspect_source("cuda") for m in _cuda_modules(module)]


def cuda_source(mod_or_func, arch: str) -> str:
    """Compiles a PrimFunc or an IRModule for ``arch`` and returns its CUDA C source.

    Args:
        mod_or_func: a ``tvm.tirx.PrimFunc`` with a ``global_symbol``, or an IRModule
            whose functions are already scheduled for the GPU (thread-bound).
        arch: the CUDA architecture, such as ``"sm_90"``.

    Returns:
        The source of every kernel in the module, as one string.

    Raises:
        SparseccError: if the built module holds no CUDA code.
    """
    import tvm

    mod = mod_or_func
    if isinstance(mod_or_func, tvm.tirx.PrimFunc):
        mod = tvm.IRModule({str(mod_or_func.attrs["global_symbol"]): mod_or_func})
    executable = tvm.compile(mod, target=cuda_target(arch))
    sources = cuda_sources(executable.mod)
    if not sources:
        raise SparseccError(f"the module compiled for {arch} holds no CUDA kernels.")
    return "\n".join(sources)


def compile_ptx(source: str, arch: str) -> str:
    """Compiles CUDA C source to PTX for ``arch`` with nvcc.

    Args:
        source: CUDA C source, as from ``cuda_source``.
        arch: the CUDA architecture, such as ``"sm_90"``.

    Returns:
        The PTX text.

    Raises:
        SparseccError: if nvcc is not installed or fails on the source.
    """
    from tvm.support import nvcc

    if shutil.which("nvcc") is None:
        raise SparseccError("nvcc was not found on PATH; install the CUDA toolkit to compile CUDA kernels to PTX.")
    # compile_cuda reads the architecture from the current target.
    with cuda_target(arch):
        try:
            ptx = nvcc.compile_cuda(source, target_format="ptx", compiler="nvcc")
        except Exception as exc:  # nvcc's first error line stands for the rest
            lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
            detail = next((line for line in lines if ": error" in line), lines[-1] if lines else "no message")
            raise SparseccError(
                f"nvcc could not compile the CUDA source for {arch}: {detail.rstrip('.')}."
            ) from None
    return bytes(ptx).decode()


def use_nvcc_without_nvrtc() -> None:
    """``runtime.executor.choose_cuda_compiler``: nvcc when NVRTC's bindings are missing."""
    from runtime.executor import choose_cuda_compiler

    choose_cuda_compiler()
