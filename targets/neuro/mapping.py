"""Placing synaptic layers on the cores of a chip model, with hard capacity checks.

A layer ``y = x @ W`` ([K, N]) is split by output neurons: each core takes a contiguous
range of columns of ``W`` and stores, for every input row ``k``, the nonzero weights of
its columns (an event-driven synapse table). A core of a layer holds

    bytes = nnz * (weight_bits + index_bits) / 8       synapses (nonzero weight + target index)
          + (K + 1) * row_pointer_bits / 8             where each input's synapses start
          + neurons * state_bits / 8                   one state per output neuron
          + neurons * routing_entry_bits / 8           one routing entry per output neuron

and must stay within ``memory_bytes``, ``neurons`` and ``fan_in``. Columns are packed
greedily: each core takes as many as fit, so a layer that does not fit one core is split
over as many as it needs. Layers take cores in graph order, row-major within a chip and
chip after chip, so consecutive layers sit close together on the mesh. A model that needs
more cores than the chips have is refused with the number it needs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from runtime.errors import SparseccError
from targets.neuro.legalize import SynapticLayer


@dataclass
class Placement:
    """Where one layer lives: ``cores[i]`` holds columns ``columns[i]:columns[i + 1]``."""

    cores: list[int]
    columns: list[int]
    bytes_per_core: list[int]

    def to_dict(self) -> dict:
        return {"cores": self.cores, "columns": self.columns, "bytes": self.bytes_per_core}


def synapse_bytes(chip: dict) -> float:
    return (chip["weight_bits"] + chip["index_bits"]) / 8


def neuron_bytes(chip: dict) -> float:
    return (chip["state_bits"] + chip["routing_entry_bits"]) / 8


def _split_columns(layer: SynapticLayer, chip: dict) -> tuple[list[int], list[int]]:
    """Column boundaries of the cores of ``layer`` and each core's bytes."""
    k, n = layer.weight.shape
    if k > chip["fan_in"]:
        raise SparseccError(f"layer {layer.name} has {k} inputs, more than the {chip['fan_in']} a core of "
                            f"{chip['name']} takes (fan_in); splitting a layer's inputs over cores is not built.")
    fixed = (k + 1) * chip["row_pointer_bits"] / 8
    per_column = np.count_nonzero(layer.weight, axis=0) * synapse_bytes(chip) + neuron_bytes(chip)
    cumulative = np.concatenate([[0.0], np.cumsum(per_column)])
    budget = chip["memory_bytes"] - fixed
    if budget < per_column.max(initial=0):
        need = fixed + per_column.max()
        raise SparseccError(f"one neuron of layer {layer.name} needs {need:.0f} bytes of a core "
                            f"(its {k} row pointers and synapses), more than the {chip['memory_bytes']} of {chip['name']}.")
    columns, sizes = [0], []
    while columns[-1] < n:
        start = columns[-1]
        end = int(np.searchsorted(cumulative, cumulative[start] + budget, side="right")) - 1
        end = min(end, start + chip["neurons"], n)
        columns.append(end)
        sizes.append(int(math.ceil(fixed + cumulative[end] - cumulative[start])))
    return columns, sizes


def place(layers: list[SynapticLayer], chip: dict) -> tuple[list[Placement], list[str]]:
    """Places every layer on its own cores; returns the placements and explanations.

    Raises:
        SparseccError: when a layer cannot be split to fit a core, or the model needs more
            cores than ``chip["chips"]`` chips have (the message gives the number needed).
    """
    splits = [_split_columns(layer, chip) for layer in layers]
    needed = sum(len(sizes) for _, sizes in splits)
    available = chip["cores_per_chip"] * chip["chips"]
    if needed > available:
        chips_needed = math.ceil(needed / chip["cores_per_chip"])
        raise SparseccError(
            f"the model needs {needed} cores of {chip['name']} but {chip['chips']} chip(s) have {available}; "
            f"compile with --chips {chips_needed} or prune the weights further."
        )
    placements, explanations, next_core = [], [], 0
    for index, (layer, (columns, sizes)) in enumerate(zip(layers, splits)):
        cores = list(range(next_core, next_core + len(sizes)))
        next_core += len(sizes)
        placements.append(Placement(cores, columns, sizes))
        fill = max(sizes) / chip["memory_bytes"] if sizes else 0.0
        explanations.append(f"neuro: layer {index} ({layer.name}) -> {len(cores)} core(s) {cores[0]}..{cores[-1]}, "
                            f"fullest at {fill:.0%} of {chip['memory_bytes'] // 1024} KB.")
    explanations.append(f"neuro: {needed} of {available} cores used ({chip['chips']} chip(s) of {chip['name']}).")
    return placements, explanations


def synapse_tables(layer: SynapticLayer, placement: Placement) -> dict[str, np.ndarray]:
    """The event-driven synapse tables of a placed layer, as the simulator reads them.

    ``row_ptr[c, k] : row_ptr[c, k + 1]`` are the entries of ``cols`` (output column) and
    ``vals`` (weight) that core ``c`` touches for an event on input ``k``.
    """
    k, _ = layer.weight.shape
    columns = placement.columns
    row_ptr = np.zeros((len(placement.cores), k + 1), np.int32)
    cols, vals, offset = [], [], 0
    for c in range(len(placement.cores)):
        block = layer.weight[:, columns[c]:columns[c + 1]]
        rows, local = np.nonzero(block)  # row-major: entries grouped by input row
        counts = np.bincount(rows, minlength=k)
        row_ptr[c] = offset + np.concatenate([[0], np.cumsum(counts)])
        cols.append((local + columns[c]).astype(np.int32))
        vals.append(block[rows, local].astype(np.float32))
        offset += rows.size
    if offset >= 2 ** 31:
        raise SparseccError(f"layer {layer.name} has more than 2^31 nonzero weights; the simulator indexes them with int32.")
    return {
        "row_ptr": row_ptr,
        "cols": np.concatenate(cols) if cols else np.zeros(0, np.int32),
        "vals": np.concatenate(vals) if vals else np.zeros(0, np.float32),
        "core_cols": np.asarray(columns, np.int32),
    }
