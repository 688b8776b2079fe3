"""Running a neuromorphic artifact: an event-driven simulation of the chip model.

The artifact holds the controllers' program (every op that is not a synaptic layer,
compiled by TVM for the host as ``model.so``), the per-core event kernel (``events.so``),
the synapse tables of every placed layer, and the chip model's numbers in the manifest.
When the program reaches a synaptic layer it calls back into :class:`NeuroModel`, which

1. applies the layer's gate; the nonzero entries that remain are the layer's events;
2. runs the event kernel: each core performs one synaptic operation per nonzero weight in
   the rows of the events it receives, so the output equals ``gate(x) @ W``;
3. counts what the chip would do: events generated, synaptic operations and events
   received per core, neuron updates, and the packets each event sends over the mesh
   (one per destination core that holds a nonzero weight in its row, XY-routed, with the
   hops, chip crossings and the load of the busiest link).

Turning the counts into time and energy is the profiler's job
(``targets.neuro.cost``); this module only needs numpy and the TVM runtime.

Mesh geometry: inside a chip, core ``i`` is at ``(i % columns, i // columns)``; several
chips are tiled as a near-square grid of chips into one mesh (``chip_grid``). Events entering from the host arrive at core 0. Input
``k`` of a layer with ``K`` inputs is produced by source core ``sources[k * S // K]``,
where ``sources`` are the ``S`` cores of the layer whose controllers computed it.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from runtime.errors import SparseccError
from runtime.executor import CompiledModel, load_library

CALLBACK = "sparsecc_neuro_linear"
_ACTIVE: list = []  # the model whose run is in progress (the callback has no other context)


def chip_grid(chip: dict) -> tuple[int, int]:
    """(chips per row, rows of chips): several chips are tiled as a near-square grid."""
    across = math.ceil(math.sqrt(chip["chips"]))
    return across, math.ceil(chip["chips"] / across)


def core_xy(chip: dict, core: int) -> tuple[int, int]:
    """Mesh coordinates of ``core`` in the whole system."""
    chip_index, local = divmod(core, chip["cores_per_chip"])
    y, x = divmod(local, chip["columns"])
    chip_y, chip_x = divmod(chip_index, chip_grid(chip)[0])
    return chip_x * chip["columns"] + x, chip_y * chip["rows"] + y


def chip_crossings(chip: dict, source: int, destination: int) -> int:
    """Chip boundaries an XY-routed packet crosses."""
    (x, y), (tx, ty) = core_xy(chip, source), core_xy(chip, destination)
    return abs(x // chip["columns"] - tx // chip["columns"]) + abs(y // chip["rows"] - ty // chip["rows"])


def xy_route(chip: dict, source: int, destination: int) -> list[tuple[int, int, int]]:
    """The links (x, y, direction) an XY-routed packet crosses: first along x, then y."""
    (x, y), (tx, ty) = core_xy(chip, source), core_xy(chip, destination)
    links = []
    while x != tx:
        step = 1 if tx > x else -1
        links.append((x, y, 0 if step > 0 else 1))
        x += step
    while y != ty:
        step = 1 if ty > y else -1
        links.append((x, y, 2 if step > 0 else 3))
        y += step
    return links


@dataclass
class LayerCounts:
    """What one synaptic layer did, summed over every row (token) it processed."""

    rows: int = 0
    events: int = 0
    synaptic_ops: np.ndarray = None  # per core
    received: np.ndarray = None  # events received per core
    packets: int = 0
    hops: int = 0
    chip_crossings: int = 0
    max_link_load: float = 0.0  # per row, the busiest link's packets
    max_hops: int = 0
    # Without events, every input value goes to every core of the layer; per row.
    dense_hops: float = 0.0
    dense_chip_crossings: float = 0.0
    dense_max_link_load: float = 0.0

    def to_dict(self) -> dict:
        return {"rows": self.rows, "events": self.events, "synaptic_ops": self.synaptic_ops.tolist(),
                "received": self.received.tolist(), "packets": self.packets, "hops": self.hops,
                "chip_crossings": self.chip_crossings, "max_link_load": self.max_link_load, "max_hops": self.max_hops,
                "dense_hops": self.dense_hops, "dense_chip_crossings": self.dense_chip_crossings,
                "dense_max_link_load": self.dense_max_link_load}


@dataclass
class _Layer:
    """A placed layer as the simulator holds it."""

    spec: dict
    tables: list  # TVM tensors: row_ptr, cols, vals, core_cols
    row_nnz: np.ndarray  # [cores, K]: nonzero weights of each input row on each core
    threshold: np.ndarray | None
    source_of_input: np.ndarray  # [K]: index into the source cores
    pair_hops: np.ndarray  # [cores, sources]
    pair_crossings: np.ndarray  # [cores, sources]
    link_pair: np.ndarray  # for every (pair, link) on a route: the flat pair index
    link_id: np.ndarray  # ... and the link
    dense_traffic: dict = field(default_factory=dict)  # LayerCounts' dense_* fields, per row
    counts: LayerCounts = field(default_factory=LayerCounts)


def _routes(chip: dict, cores: list[int], sources: list[int]):
    hops = np.zeros((len(cores), len(sources)), np.int64)
    crossings = np.zeros_like(hops)
    link_pair, link_key = [], []
    for c, core in enumerate(cores):
        for s, source in enumerate(sources):
            links = xy_route(chip, source, core)
            hops[c, s] = len(links)
            crossings[c, s] = chip_crossings(chip, source, core)
            link_pair.extend([c * len(sources) + s] * len(links))
            link_key.extend(links)
    if link_key:
        _, link_id = np.unique(np.asarray(link_key), axis=0, return_inverse=True)
    else:
        link_id = np.zeros(0, np.int64)
    return hops, crossings, np.asarray(link_pair, np.int64), np.asarray(link_id, np.int64).reshape(-1)


class NeuroModel(CompiledModel):
    """A neuromorphic artifact loaded for simulation (``runtime.load`` returns it).

    ``run(inputs)`` returns the outputs; ``simulate(inputs)`` returns the outputs and the
    per-layer counts of the run.
    """

    def __init__(self, path, manifest):
        import tvm
        from tvm.runtime import vm as tvm_vm

        self.path = Path(path)
        self.manifest = manifest
        self.lock = threading.Lock()  # CompiledModel.call serialises calls on it
        self._weight_cache = {}  # CompiledModel._load_weights shares weights through it
        target = manifest.target
        host = str(tvm.target.codegen.llvm_get_system_cpu())
        if target.get("mcpu") and target["mcpu"] != host:
            raise SparseccError(f"{path} was compiled for CPU {target['mcpu']!r} but this machine is {host!r}; recompile it here.")
        self.chip = target["chip"]
        self.device = tvm.cpu(0)
        try:
            program = load_library(self.path / manifest.library, manifest.files.get(manifest.library))
            events = target["event_library"]
            self._kernel = load_library(self.path / events, manifest.files.get(events))["neuro_events"]
        except Exception as exc:  # a library that fails to load is a damaged artifact
            raise SparseccError(f"{path}: its compiled libraries cannot be loaded ({exc}).") from None
        _register_callback()  # the VM looks its packed functions up when it is created
        self._vm = tvm_vm.VirtualMachine(program, self.device)
        tensors = dict(zip((w.name for w in manifest.weights), self._load_weights()))
        self._weights = [tensors[name] for name in target["program_weights"]]
        self.layers = [self._layer(spec, tensors) for spec in target["layers"]]
        self.reset_counts()

    def _layer(self, spec: dict, tensors: dict) -> _Layer:
        tables = [tensors[spec["tables"][part]] for part in ("row_ptr", "cols", "vals", "core_cols")]
        row_ptr = tables[0].numpy()
        k = spec["shape"][0]
        sources = spec["source_cores"]
        cores = spec["placement"]["cores"]
        hops, crossings, link_pair, link_id = _routes(self.chip, cores, sources)
        threshold = tensors[spec["threshold"]].numpy() if spec.get("threshold") else None
        source_of_input = (np.arange(k) * len(sources) // k).astype(np.int64)
        # Without events every input value goes to every core of the layer.
        dense_pairs = np.broadcast_to(np.bincount(source_of_input, minlength=len(sources)).astype(np.float64), hops.shape)
        dense_traffic = {
            "dense_hops": float((dense_pairs * hops).sum()),
            "dense_chip_crossings": float((dense_pairs * crossings).sum()),
            "dense_max_link_load": float(np.bincount(link_id, weights=dense_pairs.ravel()[link_pair]).max()) if link_id.size else 0.0,
        }
        return _Layer(spec, tables, np.diff(row_ptr, axis=1).astype(np.int32), threshold, source_of_input,
                      hops, crossings, link_pair, link_id, dense_traffic)

    def reset_counts(self) -> None:
        for layer in self.layers:
            cores = len(layer.spec["placement"]["cores"])
            layer.counts = LayerCounts(synaptic_ops=np.zeros(cores, np.int64), received=np.zeros(cores, np.int64),
                                       **layer.dense_traffic)

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Runs the model once, event by event; returns ``{output name: array}``."""
        self.reset_counts()
        _ACTIVE.append(self)
        try:
            return super().run(inputs)
        finally:
            _ACTIVE.pop()

    def simulate(self, inputs: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], list[LayerCounts]]:
        """Runs the model; returns the outputs and what every layer did."""
        outputs = self.run(inputs)
        return outputs, [layer.counts for layer in self.layers]

    def synaptic_layer(self, index: int, x: np.ndarray, out=None) -> np.ndarray | None:
        """Executes layer ``index`` on ``x`` [rows, K] (events, kernel, counts).

        Returns y [rows, N], or None when it was written into ``out`` (a TVM tensor).
        """
        import tvm

        layer = self.layers[index]
        k, n = layer.spec["shape"]
        x = np.asarray(x, np.float32).reshape(-1, k)
        gate = layer.spec["gate"]
        if gate == "threshold":
            x = np.where(np.abs(x) > layer.threshold, x, np.float32(0))
        elif gate == "relu":
            x = np.maximum(x, np.float32(0))
        rows, inputs = np.nonzero(x)
        ev_ptr = np.searchsorted(rows, np.arange(x.shape[0] + 1)).astype(np.int32)
        ev_idx = inputs.astype(np.int32)
        ev_val = x[rows, inputs]
        if ev_idx.size == 0:  # TVM takes no empty tensors; ev_ptr says there is nothing to read
            ev_idx, ev_val = np.zeros(1, np.int32), np.zeros(1, np.float32)
        y = out if out is not None else tvm.runtime.tensor(np.empty((x.shape[0], n), np.float32), self.device)
        self._kernel(*(tvm.runtime.tensor(a, self.device) for a in (ev_ptr, ev_idx, ev_val)), *layer.tables, y)
        self._count(layer, x.shape[0], inputs)
        return None if out is not None else y.numpy()

    def _count(self, layer: _Layer, rows: int, inputs: np.ndarray) -> None:
        counts = layer.counts
        touched = layer.row_nnz[:, inputs]  # [cores, events]
        active = touched > 0  # one packet per destination core with synapses for the event
        counts.rows += rows
        counts.events += int(inputs.size)
        counts.synaptic_ops += touched.sum(axis=1, dtype=np.int64)
        counts.received += active.sum(axis=1)
        sources = layer.pair_hops.shape[1]
        one_hot = np.zeros((inputs.size, sources), np.float64)
        one_hot[np.arange(inputs.size), layer.source_of_input[inputs]] = 1.0
        pairs = active.astype(np.float64) @ one_hot  # [cores, sources] packets
        counts.packets += int(pairs.sum())
        counts.hops += int((pairs * layer.pair_hops).sum())
        counts.chip_crossings += int((pairs * layer.pair_crossings).sum())
        if layer.link_id.size:
            loads = np.bincount(layer.link_id, weights=pairs.ravel()[layer.link_pair])
            counts.max_link_load = max(counts.max_link_load, float(loads.max()) / rows)
        used = pairs > 0
        if used.any():
            counts.max_hops = max(counts.max_hops, int(layer.pair_hops[used].max()))


def _synaptic_callback(x, layer, out):
    if not _ACTIVE:
        raise RuntimeError("a neuromorphic program ran outside NeuroModel.run")
    model = _ACTIVE[-1]
    index = int(np.from_dlpack(layer)[0])
    model.synaptic_layer(index, np.from_dlpack(x), out)


_REGISTERED: list = []


def _register_callback() -> None:
    if not _REGISTERED:
        import tvm_ffi

        tvm_ffi.register_global_func(CALLBACK, _synaptic_callback, override=True)
        _REGISTERED.append(True)
