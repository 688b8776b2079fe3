"""The host CPU as a TVM target: its own ``mcpu`` and every core."""

from __future__ import annotations

import os


def host_cpu_name() -> str:
    """LLVM's name for this machine's CPU (for example ``znver4`` or ``sapphirerapids``)."""
    import tvm

    return str(tvm.target.codegen.llvm_get_system_cpu())


def host_target():
    """A TVM LLVM target for this host: native ``mcpu``, all cores."""
    import tvm

    return tvm.target.Target(
        {"kind": "llvm", "mcpu": host_cpu_name(), "num-cores": os.cpu_count() or 1}
    )
