"""Chip models for the neuromorphic target, read from ``targets/hardware/*.toml``.

A chip model is a data file (``kind = "neuromorphic"``) whose every number is a table
``{value = ..., source = "..."}`` or ``{value = ..., estimate = true, why = "..."}``, so a
reader of a profile can trace each figure. ``load_chip`` checks the file and returns the
numbers as one flat, JSON-ready dict that goes into the artifact's manifest: the runtime's
simulator and the profiler read the chip from there, never from this package.
"""

from __future__ import annotations

from runtime.errors import SparseccError
from targets import MAX_CHIPS, hardware

# Every key a neuromorphic chip model must give: dotted name -> (type, lowest value).
KEYS: dict[str, tuple[type | tuple[type, ...], float]] = {
    "mesh.columns": (int, 1),
    "mesh.rows": (int, 1),
    "core.memory_bytes": (int, 1),
    "core.neurons": (int, 1),
    "core.fan_in": (int, 1),
    "core.lanes": (int, 1),
    "core.clock_hz": ((int, float), 1e-9),
    "core.weight_bits": (int, 1),
    "core.index_bits": (int, 1),
    "core.state_bits": (int, 1),
    "core.row_pointer_bits": (int, 1),
    "core.routing_entry_bits": (int, 1),
    "core.sram_bytes_per_cycle": ((int, float), 1e-9),
    "core.cycles_per_instruction": ((int, float), 0),
    "core.cycles_per_event_received": ((int, float), 0),
    "noc.event_bits": (int, 1),
    "noc.value_bits": (int, 1),
    "noc.hop_cycles": ((int, float), 0),
    "noc.link_cycles_per_event": ((int, float), 0),
    "energy.synaptic_op_pj": ((int, float), 0),
    "energy.neuron_update_pj": ((int, float), 0),
    "energy.event_generated_pj": ((int, float), 0),
    "energy.event_received_pj": ((int, float), 0),
    "energy.noc_hop_pj": ((int, float), 0),
    "energy.interchip_hop_pj": ((int, float), 0),
    "energy.sram_byte_pj": ((int, float), 0),
    "energy.controller_instruction_pj": ((int, float), 0),
    "energy.static_power_w": ((int, float), 0),
    "timing.barrier_s": ((int, float), 0),
}


def _check_provenance(spec: dict, dotted: str) -> None:
    node = _node(spec, dotted)
    where = spec.get("path", spec.get("name"))
    if not isinstance(node, dict):
        raise SparseccError(
            f"{where}: {dotted!r} gives no source; write {{value = {node!r}, source = \"...\"}} "
            f"or mark it {{value = {node!r}, estimate = true}}."
        )
    if not node.get("source") and node.get("estimate") is not True:
        raise SparseccError(f"{where}: {dotted!r} needs a 'source' or 'estimate = true' beside its value.")


def load_chip(name_or_path: str, chips: int = 1) -> dict:
    """The chip model ``name_or_path`` (``seneca``, ``loihi2`` or a .toml file) as flat numbers.

    Args:
        name_or_path: a built-in name or a path to a user's chip model.
        chips: how many chips are joined into one system; they are tiled as a near-square
            grid into one mesh whose links between chips cost ``interchip_hop_pj``
            (``runtime.neuro.chip_grid``).

    Raises:
        SparseccError: for an unknown or malformed model, a missing, non-positive or
            unsourced number, or a bad chip count.
    """
    if not isinstance(chips, int) or not 1 <= chips <= MAX_CHIPS:
        raise SparseccError(f"--chips must be a whole number from 1 to {MAX_CHIPS}, not {chips!r}.")
    spec = hardware.load(name_or_path, "neuromorphic")
    hardware.require(spec, {key: kind for key, (kind, _) in KEYS.items()})
    flat = {"name": spec["name"], "description": spec.get("description", ""), "file": spec["path"], "chips": chips}
    sources = {}
    for dotted, (_, lowest) in KEYS.items():
        _check_provenance(spec, dotted)
        number = hardware.value(spec, dotted)
        if number < lowest:
            raise SparseccError(f"{spec['path']}: {dotted!r} must be at least {lowest:g}, not {number!r}.")
        key = dotted.split(".", 1)[1]
        flat[key] = float(number) if isinstance(number, float) else int(number)
        table = _node(spec, dotted)
        sources[key] = table.get("source") or f"estimate: {table.get('why', 'no reason given')}"
    flat["cores_per_chip"] = flat["columns"] * flat["rows"]
    flat["sources"] = sources
    return flat


def _node(spec: dict, dotted: str) -> dict:
    node = spec
    for part in dotted.split("."):
        node = node[part]
    return node

