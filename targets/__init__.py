"""Compilation targets, found by name in one table.

Every target package exposes the same functions (see ``targets.base.Target``); a new target
is a new folder plus one row here.
"""

from __future__ import annotations

import importlib

from runtime.errors import SparseccError

# name -> (package, built). Targets not yet built are listed so that users get an
# honest "not built yet" instead of "unknown target".
TARGETS = {
    "cpu": ("targets.cpu", True),
    "cuda": ("targets.cuda", True),
    "neuro": ("targets.neuro", True),
}


# The most chips a neuro:<chip> target joins: a 64 x 64 mesh, the largest the cost model
# is meant for (more would only cost memory).
MAX_CHIPS = 4096


def target_names() -> list[str]:
    return ["cpu", "cuda[:sm_80|sm_87|sm_90]", "neuro:<chip>"]


def get_target(spec: str, chips: int = 1):
    """Returns the target for ``spec`` (``cpu``, ``cuda``, ``neuro:<chip>``); ``chips`` is
    how many chips a neuromorphic target joins.

    Raises:
        SparseccError: for an unknown name (listing the choices) or a target not built yet.
    """
    name, _, option = spec.partition(":")
    if name not in TARGETS or (name == "neuro" and not option) or (name == "cpu" and option):
        raise SparseccError(f"unknown target {spec!r}; choose one of {', '.join(target_names())}.")
    package, built = TARGETS[name]
    if not built:
        raise SparseccError(f"target {spec!r} is not built yet (see the README's feature table).")
    if chips != 1 and name != "neuro":
        raise SparseccError(f"--chips applies to neuro:<chip> targets, not {spec!r}.")
    module = importlib.import_module(package)
    return module.make_target(option, chips) if option else module.make_target()
