"""The machine's memory, and the check that something fits in it before it is allocated.

A size taken from a model or a manifest (an input dimension of 2^40, an Expand to 2^45
elements, a batch of 10^8) would otherwise reach numpy, torch or TVM, which try to
allocate it and fail with ``bad_alloc`` or a killed process, or swap for minutes.
"""

from __future__ import annotations

import os

from runtime.errors import SparseccError


def machine_memory_bytes() -> int:
    """Physical memory, or the cgroup's limit where one is set lower (a container)."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        with open("/sys/fs/cgroup/memory.max") as limit:
            text = limit.read().strip()
        if text.isdigit():
            total = min(total, int(text))
    except OSError:
        pass
    return total


def human_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if count < 1024 or unit == "PiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} PiB"


def check_fits(nbytes: int, what: str) -> None:
    """Refuses ``what`` (a phrase such as "input 'x' of shape [2^40, 16]") when its
    ``nbytes`` exceed the machine's memory."""
    available = machine_memory_bytes()
    if nbytes > available:
        raise SparseccError(f"{what} would take {human_bytes(nbytes)}, more than this machine's "
                            f"{human_bytes(available)} of memory.")
