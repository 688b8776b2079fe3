"""The TVM runtime without the TVM compiler, torch or transformers.

``import tvm`` loads ``libtvm_compiler.so`` and ``tvm.relax``, and ``tvm_ffi`` imports
torch whenever it is installed (to avoid a symbol clash on one Windows setup). A program
that embeds a compiled model needs none of that. When nothing has imported ``tvm`` yet,
``tvm()`` imports it in TVM's runtime-only mode (``TVM_USE_RUNTIME_LIB=1``: only
``libtvm_runtime.so``, no ``tvm.relax``), with torch's import refused for that moment
(``tvm_ffi`` catches the ImportError) and its optional torch DLPack bridge switched off.
When the compiler has already imported the full TVM in this process, that one is used.

A consequence: after the runtime has loaded TVM runtime-only, the compiler cannot run in
the same process; import ``tvm`` (or ``compiler``) first in programs that do both.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import os
import sys

# TVM reads this once at import; without it the thread pool uses half the cores.
os.environ.setdefault("TVM_NUM_THREADS", str(os.cpu_count() or 1))

# Instruction-set flags (as /proc/cpuinfo names them) that LLVM may use for an -mcpu.
ISA_PREFIXES = ("sse", "ssse", "avx", "fma", "f16c", "bmi", "popcnt", "movbe", "abm", "adx", "aes", "pclmul", "sha",
                "vaes", "vpclmul", "gfni", "amx", "asimd", "sve", "neon", "fp", "atomics")


class _RefuseImports(importlib.abc.MetaPathFinder):
    def __init__(self, names: tuple[str, ...]):
        self.names = names

    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in self.names:
            raise ImportError(f"{name} is not needed by the sparsecc runtime")
        return None


@contextlib.contextmanager
def _runtime_only_import():
    saved = {key: os.environ.get(key) for key in ("TVM_USE_RUNTIME_LIB", "TVM_FFI_DISABLE_TORCH_C_DLPACK")}
    os.environ["TVM_USE_RUNTIME_LIB"] = "1"
    os.environ["TVM_FFI_DISABLE_TORCH_C_DLPACK"] = "1"
    refuse = _RefuseImports(("torch", "transformers"))
    sys.meta_path.insert(0, refuse)
    try:
        yield
    finally:
        sys.meta_path.remove(refuse)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def tvm():
    """The ``tvm`` module: the one already imported, or the runtime-only one."""
    if "tvm" not in sys.modules:
        with _runtime_only_import():
            import tvm as module  # noqa: F401
    import tvm as module

    return module


def llvm_cpu_name() -> str | None:
    """LLVM's name for this CPU when the full TVM is loaded (None in runtime-only mode)."""
    module = tvm()
    function = module.get_global_func("target.llvm_get_system_cpu", allow_missing=True)
    return str(function()) if function is not None else None


def isa_flags() -> list[str]:
    """This CPU's instruction-set flags from /proc/cpuinfo (empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith(("flags", "Features")):
                    return sorted({f for f in line.split(":", 1)[1].split() if f.startswith(ISA_PREFIXES)})
    except OSError:
        pass
    return []
