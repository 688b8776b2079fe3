"""The neuromorphic target: synaptic layers placed on a chip model's cores, the rest
compiled by TVM as the controllers' program, plus the per-core event kernel.

The artifact holds ``model.so`` (the controllers' program: the graph with every synaptic
layer replaced by a call into the simulator), ``events.so`` (the TIR event kernel),
``weights.bin`` (the program's constants and every layer's synapse tables) and, in the
manifest's ``target``, the chip model's numbers, each layer's placement and the
controllers' instruction counts. ``runtime.neuro.NeuroModel`` runs it.
"""

from __future__ import annotations

import contextlib
import math
from collections import Counter
from pathlib import Path
from typing import Callable

import numpy as np
import onnx

from passes.base import embedding_rows
from runtime.neuro import CALLBACK
from targets.base import LIBRARY, WEIGHTS, Lowered, lower_onnx, write_weights
from targets.cpu import legalize as cpu_legalize
from targets.cpu.host import host_cpu_name
from targets.cpu.target import compile_for_host
from targets.neuro.chip import load_chip
from targets.neuro.kernels import build_event_library
from targets.neuro.legalize import NEURO_LINEAR, extract_layers
from targets.neuro.mapping import place, synapse_tables

EVENT_LIBRARY = "events.so"


@contextlib.contextmanager
def _neuro_linear_converter():
    """Teaches TVM's ONNX importer ``NeuroLinear``: a ``call_dps_packed`` into the simulator."""
    from tvm import relax
    import tvm.relax.frontend.onnx.onnx_frontend as onnx_frontend

    class NeuroLinear(onnx_frontend.OnnxOpConverter):
        @classmethod
        def _impl_v1(cls, bb, inputs, attr, params):
            x = inputs[0]
            shape = [int(d) for d in x.ty.shape]
            rows, n = math.prod(shape[:-1]), int(attr["n"])
            flat = bb.emit(relax.op.reshape(x, (rows, shape[-1])))
            layer = relax.const(np.array([int(attr["layer"])], np.int32))
            y = bb.emit(relax.call_dps_packed(CALLBACK, [flat, layer], relax.TensorType((rows, n), "float32")))
            return relax.op.reshape(y, shape[:-1] + [n])

    original = onnx_frontend._get_convert_map
    onnx_frontend._get_convert_map = lambda: {**original(), NEURO_LINEAR: NeuroLinear}
    try:
        yield
    finally:
        onnx_frontend._get_convert_map = original


class NeuroTarget:
    """``neuro:<chip>``: a chip model from ``targets/hardware`` (or a .toml path), ``chips`` of it."""

    name = "neuro"
    #: Every synaptic weight is decoded to dense for the chip, so the format the graph
    #: passes choose only shapes the ONNX dumps; they choose it as for the CPU host.
    costs = cpu_legalize.COSTS

    def __init__(self, chip: str, chips: int = 1):
        self.chip = load_chip(chip, chips)
        self._layers = self._placements = self._instructions = None
        self._vocabulary = None
        self._controller_ops: dict[str, int] = {}

    def unsupported_ops(self, model: onnx.ModelProto) -> list[str]:
        # What is not a synaptic layer is the controllers' program, which the CPU's importer takes.
        from targets.cpu.lower import unsupported_ops

        return unsupported_ops(model)

    def legalize(self, model: onnx.ModelProto):
        self._vocabulary = embedding_rows(model)
        model, layers, instructions, explanations = extract_layers(model)
        placements, placed = place(layers, self.chip)
        # The CPU legalisation turns the remaining gates into standard ops and lifts
        # large constants (the embedding table) out of the controllers' program.
        self._controller_ops = dict(Counter(node.op_type for node in model.graph.node if node.op_type != NEURO_LINEAR))
        model, weights, controller = cpu_legalize.legalize(model)
        self._layers, self._placements, self._instructions = layers, placements, instructions
        return model, weights, explanations + placed + controller

    def lower(self, model: onnx.ModelProto, weights, input_shapes: dict[str, list[int]],
              dump: Callable[[str, str], None] | None = None) -> Lowered:
        from targets.cpu.lower import import_onnx

        with _neuro_linear_converter():
            return lower_onnx(import_onnx, model, weights, input_shapes, dump)

    def build(self, lowered: Lowered, staging: Path, dump: Callable[[str, str], None] | None = None) -> dict:
        compile_for_host(lowered.module, staging)
        build_event_library(staging / EVENT_LIBRARY)
        arrays = list(lowered.weights)
        layers = []
        for index, (layer, placement) in enumerate(zip(self._layers, self._placements)):
            names = {}
            for part, array in synapse_tables(layer, placement).items():
                if array.size == 0:  # TVM takes no empty tensors; row_ptr says nothing is read
                    array = np.zeros(1, array.dtype)
                names[part] = f"layer{index}.{part}"
                arrays.append((names[part], array, layer.name))
            threshold = ""
            if layer.gate == "threshold":
                threshold = f"layer{index}.threshold"
                arrays.append((threshold, layer.threshold, layer.name))
            source = self._placements[layer.source_layer].cores if layer.source_layer >= 0 else [0]
            layers.append({
                "name": layer.name,
                "input": layer.input,
                "output": layer.output,
                "shape": list(layer.weight.shape),
                "nonzero_weights": int(np.count_nonzero(layer.weight)),
                "gate": layer.gate,
                "threshold": threshold,
                "tables": names,
                "placement": placement.to_dict(),
                "source_layer": layer.source_layer,
                "step": layer.step,
                "source_cores": source,
                "controller_instructions": int(self._instructions[index]),
            })
        entries = write_weights(staging / WEIGHTS, arrays)
        return {"weights": entries, "library": LIBRARY, "weights_file": WEIGHTS, "target": {
            "name": self.name,
            "mcpu": host_cpu_name(),
            "chip": self.chip,
            "event_library": EVENT_LIBRARY,
            "program_weights": [name for name, _, _ in lowered.weights],
            "layers": layers,
            "cores_used": sum(len(p.cores) for p in self._placements),
            "vocabulary": self._vocabulary,
            "controller_ops": self._controller_ops,
        }}
