"""CUDA code generation without a GPU: TIR or Relax to CUDA C source, source to PTX, and
the facts of each kernel.

TVM 0.27's ``tvm.compile`` for a ``cuda`` target keeps the kernels as CUDA source inside
the built module (the runtime JIT-compiles them when the module is loaded on a GPU), so
the source can be read on any machine. ``compile_ptx`` runs nvcc on it and
``ptxas_usage`` ptxas on the PTX, which need the CUDA toolkit but no device.
``kernel_report`` reads each ``__global__`` kernel's threads per block, static shared
memory and barriers from the source or the PTX, ``kernel_facts`` adds ptxas's registers
and spills, and ``within_limits`` compares them with ``ARCH_LIMITS``.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile

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


# --- Kernel facts: launch bounds, shared memory, barriers, registers ---------------------

_PTXAS_ENTRY = re.compile(r"Compiling entry function '(\w+)'")
_PTXAS_SPILLS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_REGISTERS = re.compile(r"Used (\d+) registers")
_PTXAS_SHARED = re.compile(r"(\d+) bytes smem")


def ptxas_usage(ptx: str, arch: str) -> dict[str, dict]:
    """Assembles PTX with ``ptxas -v`` and returns each kernel's resource usage.

    Args:
        ptx: PTX text, as from ``compile_ptx``.
        arch: the CUDA architecture, such as ``"sm_90"``.

    Returns:
        ``{kernel name: {"registers", "shared_bytes", "stack_bytes", "spill_stores",
        "spill_loads"}}`` (bytes, and 32-bit registers per thread).

    Raises:
        SparseccError: if ptxas is not installed or rejects the PTX.
    """
    if shutil.which("ptxas") is None:
        raise SparseccError("ptxas was not found on PATH; install the CUDA toolkit to assemble PTX.")
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "kernels.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        done = subprocess.run(
            ["ptxas", f"-arch={arch}", "-v", path, "-o", os.path.join(folder, "kernels.cubin")],
            capture_output=True, text=True,
        )
    if done.returncode != 0:
        first = next((line for line in done.stderr.splitlines() if "error" in line), done.stderr.strip())
        raise SparseccError(f"ptxas could not assemble the PTX for {arch}: {first.rstrip('.')}.")
    usage: dict[str, dict] = {}
    current = None
    for line in (done.stdout + done.stderr).splitlines():
        entry = _PTXAS_ENTRY.search(line)
        if entry:
            current = usage.setdefault(entry.group(1), {"registers": 0, "shared_bytes": 0})
            continue
        if current is None:
            continue
        spills = _PTXAS_SPILLS.search(line)
        if spills:
            current["stack_bytes"], current["spill_stores"], current["spill_loads"] = map(int, spills.groups())
        registers = _PTXAS_REGISTERS.search(line)
        if registers:
            current["registers"] = int(registers.group(1))
            shared = _PTXAS_SHARED.search(line)
            current["shared_bytes"] = int(shared.group(1)) if shared else 0
    return usage



_PTX_ENTRY = re.compile(r"\.entry\s+(\w+)\s*\(")
_PTX_MAXNTID = re.compile(r"\.maxntid\s+(\d+)(?:\s*,\s*(\d+))?(?:\s*,\s*(\d+))?")
_PTX_SHARED = re.compile(r"\.shared\s+(?:\.align\s+\d+\s+)?\.(?:b|u|s|f)(\d+)\s+\w+\[(\d+)\]")
# A definition (not a declaration): the parameter list is followed by the body.
_CU_KERNEL = re.compile(
    r"__global__\s+void\s+(?:__launch_bounds__\((\d+)\)\s+)?(\w+)\s*\([^)]*\)\s*\{"
)
_CU_SHARED = re.compile(
    r"__shared__\s+(?:(?:alignas|__align__)\(\d+\)\s+)?(\w+)\s+\w+\[(\d+)\]"
)
_CU_TYPE_BYTES = {"float": 4, "int": 4, "uint": 4, "half": 2, "double": 8, "char": 1, "short": 2}
_PTX_BARRIER = re.compile(r"\b(?:bar|barrier)\.sync\b")
_CU_BARRIER = re.compile(r"__syncthreads\(\)")


def kernel_report(code: str) -> list[dict]:
    """Lists each ``__global__`` kernel of CUDA source or PTX with its launch facts.

    Args:
        code: CUDA C source as TVM emits it, or PTX from ``codegen.compile_ptx``.

    Returns:
        One dict per kernel, in order: ``name``, ``threads_per_block`` (PTX ``.maxntid``
        or the source's ``__launch_bounds__``; None when neither is given) and
        ``static_shared_bytes`` (the sum of the kernel's ``.shared`` / ``__shared__``
        arrays) and ``barriers`` (its ``bar.sync`` / ``__syncthreads()`` statements).
    """
    ptx = ".entry" in code
    entry, shared = (_PTX_ENTRY, _PTX_SHARED) if ptx else (_CU_KERNEL, _CU_SHARED)
    barrier = _PTX_BARRIER if ptx else _CU_BARRIER
    starts = list(entry.finditer(code))
    kernels = []
    for i, match in enumerate(starts):
        body = code[match.end() : starts[i + 1].start() if i + 1 < len(starts) else len(code)]
        if ptx:
            name = match.group(1)
            bound = _PTX_MAXNTID.search(body)
            threads = None
            if bound:
                threads = 1
                for side in bound.groups():
                    threads *= int(side or 1)
            shared_bytes = sum(int(bits) // 8 * int(count) for bits, count in shared.findall(body))
        else:
            name = match.group(2)
            threads = int(match.group(1)) if match.group(1) else None
            shared_bytes = sum(
                _CU_TYPE_BYTES.get(ctype, 4) * int(count) for ctype, count in shared.findall(body)
            )
        kernels.append({
            "name": name,
            "threads_per_block": threads,
            "static_shared_bytes": shared_bytes,
            "barriers": len(barrier.findall(body)),
        })
    return kernels


def within_limits(report: list[dict], arch: str) -> list[str]:
    """The ways in which the kernels of ``kernel_report`` exceed ``ARCH_LIMITS[arch]``
    (registers too, for entries that carry ``registers`` from ``codegen.ptxas_usage``).

    Returns:
        One sentence per kernel over a limit; empty when all fit.

    Raises:
        ValueError: for an arch missing from ``ARCH_LIMITS``.
    """
    if arch not in ARCH_LIMITS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(ARCH_LIMITS)}")
    limits = ARCH_LIMITS[arch]
    problems = []
    for kernel in report:
        threads = kernel["threads_per_block"]
        if threads is None or threads > limits["max_threads_per_block"]:
            problems.append(f"{kernel['name']}: {threads} threads per block on {arch}")
        if kernel["static_shared_bytes"] > limits["max_static_shared_bytes"]:
            problems.append(
                f"{kernel['name']}: {kernel['static_shared_bytes']} bytes of static shared memory on {arch}"
            )
        if kernel.get("registers", 0) > limits["max_registers_per_thread"]:
            problems.append(f"{kernel['name']}: {kernel['registers']} registers per thread on {arch}")
    return problems


def kernel_facts(mod_or_func, arch: str) -> list[dict]:
    """Every kernel of a module compiled for ``arch``, with its launch and resource facts.

    Runs ``cuda_source``, ``compile_ptx`` and ``ptxas_usage``: each entry of
    ``kernel_report`` (read from the PTX) gains ``registers``, ``shared_bytes``,
    ``stack_bytes``, ``spill_stores`` and ``spill_loads``; pass the result to
    ``within_limits``.

    Raises:
        SparseccError: if nvcc or ptxas is missing or fails.
    """
    ptx = compile_ptx(cuda_source(mod_or_func, arch), arch)
    usage = ptxas_usage(ptx, arch)
    kernels = kernel_report(ptx)
    for kernel in kernels:
        kernel.update(usage.get(kernel["name"], {}))
    return kernels
