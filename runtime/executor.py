"""Loading and running a compiled artifact with the TVM runtime and numpy only."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from runtime.artifact import Manifest, TensorSpec, read_manifest
from runtime.errors import SparseccError

# TVM reads this once at import; without it the thread pool uses half the cores.
os.environ.setdefault("TVM_NUM_THREADS", str(os.cpu_count() or 1))

SUPPORTED_TARGETS = ("cpu",)


def _host_cpu() -> str:
    import tvm

    return str(tvm.target.codegen.llvm_get_system_cpu())


class CompiledModel:
    """An artifact loaded for execution.

    Use :func:`runtime.load`; then ``model.run({"input_ids": array})`` returns a dict of
    output arrays.
    """

    def __init__(self, path: str | os.PathLike, manifest: Manifest):
        import tvm
        from tvm.runtime import vm as tvm_vm

        self.path = Path(path)
        self.manifest = manifest
        target = manifest.target.get("name")
        if target not in SUPPORTED_TARGETS:
            raise SparseccError(f"{path} was compiled for target {target!r}, which this runtime cannot run.")
        built_for = manifest.target.get("mcpu")
        if built_for and built_for != _host_cpu():
            raise SparseccError(
                f"{path} was compiled for CPU {built_for!r} but this machine is {_host_cpu()!r}; recompile it here."
            )
        self.device = tvm.cpu(0)
        try:
            library = tvm.runtime.load_module(str(self.path / manifest.library))
        except Exception as exc:  # a library that fails to load is a damaged artifact
            raise SparseccError(f"{path}: its compiled library cannot be loaded ({exc}).") from None
        self._vm = tvm_vm.VirtualMachine(library, self.device)
        self._weights = self._load_weights()

    def _load_weights(self) -> list:
        import tvm

        weights_path = self.path / self.manifest.weights_file
        if not self.manifest.weights:
            return []
        blob = np.memmap(weights_path, dtype=np.uint8, mode="r")
        tensors = []
        for spec in self.manifest.weights:
            if spec.offset + spec.nbytes > blob.size:
                raise SparseccError(f"{self.path} is corrupt: weight {spec.name} lies past the end of {weights_path.name}.")
            array = np.frombuffer(blob, dtype=spec.dtype, count=int(np.prod(spec.shape)), offset=spec.offset)
            tensors.append(tvm.runtime.tensor(array.reshape(spec.shape), self.device))
        del blob
        return tensors

    @property
    def inputs(self) -> list[TensorSpec]:
        return list(self.manifest.inputs)

    @property
    def outputs(self) -> list[TensorSpec]:
        return list(self.manifest.outputs)

    def _check_inputs(self, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        expected = {spec.name: spec for spec in self.manifest.inputs}
        unknown = sorted(set(inputs) - set(expected))
        if unknown:
            raise SparseccError(
                f"unknown input {unknown[0]!r}; this model takes {', '.join(repr(n) for n in expected)}."
            )
        missing = [name for name in expected if name not in inputs]
        if missing:
            raise SparseccError(f"missing input {missing[0]!r}; this model takes {', '.join(repr(n) for n in expected)}.")
        arrays = []
        for spec in self.manifest.inputs:
            array = np.asarray(inputs[spec.name])
            if tuple(array.shape) != spec.shape:
                raise SparseccError(
                    f"input {spec.name!r} has shape {list(array.shape)} but the model was compiled for {list(spec.shape)}."
                )
            if array.dtype != np.dtype(spec.dtype):
                raise SparseccError(f"input {spec.name!r} has dtype {array.dtype} but the model expects {spec.dtype}.")
            arrays.append(np.ascontiguousarray(array))
        return arrays

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Runs the model once; returns ``{output name: array}``."""
        import tvm

        arrays = self._check_inputs(inputs)
        args = [tvm.runtime.tensor(a, self.device) for a in arrays] + self._weights
        result = self._vm["main"](*args)
        values = list(result) if len(self.manifest.outputs) > 1 else [result]
        return {spec.name: value.numpy() for spec, value in zip(self.manifest.outputs, values)}

    def time(self, inputs: dict[str, np.ndarray], repeats: int = 5) -> float:
        """Median wall time of ``run`` in seconds, after one warm-up call."""
        self.run(inputs)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            self.run(inputs)
            times.append(time.perf_counter() - start)
        return float(np.median(times))


# target name -> "module:class" of the executor that runs its artifacts. Each class takes
# (path, manifest) and offers inputs, outputs, run(inputs) and time(inputs).
EXECUTORS = {
    "cpu": "runtime.executor:CompiledModel",
    "neuro": "runtime.neuro:NeuroModel",
}


def load(path: str | os.PathLike):
    """Checks and loads an artifact folder ``NAME.sccx``.

    Raises:
        SparseccError: when the artifact is missing, corrupt, of a newer format, or was built
            for another target or CPU.
    """
    import importlib

    manifest = read_manifest(path)
    target = manifest.target.get("name")
    if target not in EXECUTORS:
        raise SparseccError(f"{path} was compiled for target {target!r}, which this runtime cannot run.")
    module, _, name = EXECUTORS[target].partition(":")
    return getattr(importlib.import_module(module), name)(path, manifest)
