"""Progress lines for steps that take more than a moment."""

from __future__ import annotations

import contextlib
import sys
import time


class Progress:
    """Prints ``-> step ...`` before and ``   done in N s`` after each step, to stderr.

    Args:
        enabled: False silences it (for library use and ``--quiet``).
    """

    def __init__(self, enabled: bool = True):
        self.enabled = enabled

    def __call__(self, message: str) -> None:
        if self.enabled:
            print(f"   {message}", file=sys.stderr, flush=True)

    @contextlib.contextmanager
    def step(self, message: str):
        start = time.perf_counter()
        if self.enabled:
            print(f"-> {message} ...", file=sys.stderr, flush=True)
        yield
        if self.enabled:
            print(f"   done in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)


SILENT = Progress(enabled=False)
