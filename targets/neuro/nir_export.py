"""``sparsecc export-nir``: the part of a neuromorphic artifact that NIR can express.

NIR (the Neuromorphic Intermediate Representation, ``nir`` on PyPI) describes graphs of
linear maps and spiking neurons. From an artifact it can hold every synaptic layer, as a
``nir.Linear`` with ``weight`` [N, K] (NIR's output-by-input convention: ``W.T``), zeros
included, between a ``nir.Input`` and a ``nir.Output``; layers that feed each other
directly are connected. What NIR cannot express is left out and listed:

- the graded activation gates: NIR has no node for ``x * (|x| > t)`` (its ``Threshold``
  emits binary spikes, which is a different function), so each gate's mode and threshold
  are kept in the Linear node's ``metadata`` (``sparsecc_gate``, ``sparsecc_threshold``)
  for a reader, not as a node;
- every op the controllers run (norms, softmax, attention, embeddings, biases,
  elementwise ops), and so the connections that pass through them.

``nir`` is an optional dependency; without it the verb says how to install it.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import numpy as np

from runtime.artifact import read_manifest
from runtime.errors import SparseccError

NIR_VERSION = "1.0.8"


def _arrays(path: Path, manifest) -> dict[str, np.ndarray]:
    blob = np.memmap(path / manifest.weights_file, dtype=np.uint8, mode="r")
    return {spec.name: np.frombuffer(blob, dtype=spec.dtype, count=int(np.prod(spec.shape)), offset=spec.offset).reshape(spec.shape)
            for spec in manifest.weights}


def layer_weight(layer: dict, arrays: dict[str, np.ndarray]) -> np.ndarray:
    """The dense [K, N] weight of a placed layer, rebuilt from its synapse tables."""
    k, n = layer["shape"]
    tables = {part: arrays[name] for part, name in layer["tables"].items()}
    row_ptr = tables["row_ptr"]
    weight = np.zeros((k, n), np.float32)
    for core in range(row_ptr.shape[0]):
        counts = np.diff(row_ptr[core])
        rows = np.repeat(np.arange(k), counts)
        entries = np.arange(row_ptr[core, 0], row_ptr[core, -1])
        weight[rows, tables["cols"][entries]] = tables["vals"][entries]
    return weight


def export_nir(artifact: str, output: str) -> dict:
    """Writes the NIR graph of ``artifact``'s synaptic layers to ``output``; returns a summary
    with what was written and what was left out."""
    try:
        import nir
    except ModuleNotFoundError:
        raise SparseccError(f"export-nir needs the optional package nir; install it with: pip install nir=={NIR_VERSION}") from None
    path = Path(artifact)
    manifest = read_manifest(path)
    if manifest.target.get("name") != "neuro":
        raise SparseccError(f"{artifact} was compiled for {manifest.target.get('name')!r}; export-nir takes a neuro:<chip> artifact.")
    arrays = _arrays(path, manifest)
    layers = manifest.target["layers"]
    produced_by = {layer["output"]: index for index, layer in enumerate(layers) if layer.get("output")}
    nodes, edges = {}, []
    for index, layer in enumerate(layers):
        k, n = layer["shape"]
        metadata = {"sparsecc_name": layer["name"], "sparsecc_gate": layer["gate"]}
        if layer["threshold"]:
            metadata["sparsecc_threshold"] = np.asarray(arrays[layer["threshold"]], np.float32).copy()
        nodes[f"layer{index}"] = nir.Linear(weight=layer_weight(layer, arrays).T.copy(), metadata=metadata)
        source = produced_by.get(layer.get("input"))
        if source is not None and layer["gate"] == "none":
            edges.append((f"layer{source}", f"layer{index}"))
        else:
            nodes[f"input{index}"] = nir.Input(input_type={"input": np.array([k])})
            edges.append((f"input{index}", f"layer{index}"))
    for index, layer in enumerate(layers):
        if not any(edge[0] == f"layer{index}" for edge in edges):
            nodes[f"output{index}"] = nir.Output(output_type={"output": np.array([layer["shape"][1]])})
            edges.append((f"layer{index}", f"output{index}"))
    graph = nir.NIRGraph(nodes=nodes, edges=edges, metadata={"sparsecc_artifact": str(artifact),
                                                             "sparsecc_chip": manifest.target["chip"]["name"]})
    destination = Path(output)
    destination.parent.mkdir(parents=True, exist_ok=True)
    temporary = destination.with_name(f".{destination.name}.partial")
    try:
        nir.write(temporary, graph)
        os.replace(temporary, destination)
    finally:
        temporary.unlink(missing_ok=True)
    controller_ops = Counter(manifest.target.get("controller_ops", {}))
    gates = sum(layer["gate"] != "none" for layer in layers)
    return {
        "output": str(destination),
        "linear_layers": len(layers),
        "edges": len(edges),
        "left_out": {
            "graded_gates": gates,
            "controller_ops": dict(controller_ops),
        },
    }
