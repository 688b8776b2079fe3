"""Hardware models as data files: chips, GPUs and edge CPUs, one TOML file each.

Every file says what it models (``kind``: ``neuromorphic``, ``gpu`` or ``cpu``) and gives
every number with its source or marks it as an estimate. ``load`` finds a file by name
(``seneca`` -> ``targets/hardware/seneca.toml``) or takes a user's path, and refuses a
malformed one with one sentence; each target checks the keys its kind needs with
``require``.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

from runtime.errors import SparseccError

HERE = Path(__file__).parent


def available(kind: str | None = None) -> list[str]:
    """Names of the built-in models, optionally only those of one ``kind``."""
    names = []
    for path in sorted(HERE.glob("*.toml")):
        if kind is None or _read(path).get("kind") == kind:
            names.append(path.stem)
    return names


def _read(path: Path) -> dict:
    try:
        with open(path, "rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise SparseccError(f"hardware model {str(path)!r} does not exist.") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise SparseccError(f"hardware model {str(path)!r} is not valid TOML ({exc}).") from None
    except OSError as exc:
        raise SparseccError(f"hardware model {str(path)!r} cannot be read ({exc.strerror}).") from None


def load(name_or_path: str, kind: str) -> dict:
    """The hardware model ``name_or_path`` (a built-in name or a .toml path) of ``kind``.

    Raises:
        SparseccError: for an unknown name, an unreadable or malformed file, or a file of
            another kind.
    """
    if name_or_path.endswith(".toml") or "/" in name_or_path:
        path = Path(name_or_path)
    else:
        path = HERE / f"{name_or_path}.toml"
        if not path.exists():
            choices = ", ".join(available(kind)) or "none yet"
            raise SparseccError(f"unknown {kind} hardware model {name_or_path!r}; choose one of: {choices}, or give a .toml file.")
    spec = _read(path)
    if spec.get("kind") != kind:
        raise SparseccError(f"{path} describes a {spec.get('kind', 'unknown')!r} device, not a {kind!r} one (its 'kind' key).")
    spec.setdefault("name", path.stem)
    spec["path"] = str(path)
    return spec


def require(spec: dict, keys: dict[str, type | tuple[type, ...]]) -> None:
    """Checks that ``spec`` has every dotted key in ``keys`` with a value of the given type.

    A number may be given as a table ``{value = 1.0, source = "..."}``; such tables are
    checked on their ``value``. Raises SparseccError naming the first missing or wrong key.
    """
    for dotted, expected in keys.items():
        node = spec
        for part in dotted.split("."):
            if not isinstance(node, dict) or part not in node:
                raise SparseccError(f"{spec.get('path', spec.get('name'))}: missing key {dotted!r}.")
            node = node[part]
        if isinstance(node, dict) and "value" in node:
            node = node["value"]
        if isinstance(node, bool) or not isinstance(node, expected):
            names = expected.__name__ if isinstance(expected, type) else " or ".join(t.__name__ for t in expected)
            raise SparseccError(f"{spec.get('path', spec.get('name'))}: key {dotted!r} must be {names}, not {node!r}.")


def value(spec: dict, dotted: str):
    """The number at ``dotted``, unwrapping ``{value = ..., source = ...}`` tables."""
    node = spec
    for part in dotted.split("."):
        node = node[part]
    return node["value"] if isinstance(node, dict) and "value" in node else node
