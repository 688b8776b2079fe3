"""Loading and running a compiled artifact with the TVM runtime and numpy only."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import stat
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from runtime.artifact import Manifest, TensorSpec, read_manifest, sha256_file
from runtime.errors import SparseccError
from runtime.tvm_runtime import isa_flags, llvm_cpu_name, tvm as _tvm

SUPPORTED_TARGETS = ("cpu", "cuda")


# Absolute library path -> sha256 of the library this process loaded from it.
_LOADED_LIBRARIES: dict[str, str] = {}


def load_library(path: Path, sha256: str | None):
    """``tvm.runtime.load_module(path)``, also for a path this process already loaded a
    different library from (an artifact rebuilt in place): the dynamic loader would return
    the first library for a path it has seen, so such a library is loaded from a copy
    named by its sha256 in a private cache folder (``library_cache``)."""
    tvm = _tvm()
    key = str(Path(path).resolve())
    digest = sha256 or sha256_file(key)
    if _LOADED_LIBRARIES.setdefault(key, digest) == digest:
        return tvm.runtime.load_module(key)
    return tvm.runtime.load_module(str(cached_copy(key, digest, library_cache())))


def library_cache() -> Path:
    """``$TMPDIR/sparsecc-libraries-UID``, created 0700; refused unless it is a folder of
    this user that nobody else may write (anyone who can write there could plant a library
    that this process would run). One of this user's that others may only read (as older
    sparsecc versions made it) is closed to them first.

    Raises:
        SparseccError: when the folder belongs to another user, is open to others, or is
            not a folder.
    """
    folder = Path(tempfile.gettempdir()) / f"sparsecc-libraries-{os.getuid()}"
    try:
        os.mkdir(folder, 0o700)
    except FileExistsError:
        pass
    except OSError as exc:
        raise SparseccError(f"the library cache {folder} cannot be created ({exc.strerror}).") from None
    info = os.lstat(folder)
    if stat.S_ISDIR(info.st_mode) and info.st_uid == os.getuid() and not stat.S_IMODE(info.st_mode) & 0o022:
        os.chmod(folder, 0o700, follow_symlinks=False)
        info = os.lstat(folder)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or stat.S_IMODE(info.st_mode) & 0o077:
        raise SparseccError(f"the library cache {folder} is not private to this user (it must be a folder owned by "
                            "you with mode 0700); remove it and load again.")
    return folder


def cached_copy(source: str, digest: str, folder: Path) -> Path:
    """``folder/<digest>.so``, a copy of ``source``: a file already there is used only when
    it is a regular file (not a link) whose bytes hash to ``digest``; otherwise a new copy
    is written under an unpredictable name created exclusively, checked, and renamed over it.

    Raises:
        SparseccError: when ``source`` no longer hashes to ``digest`` (it changed after the
            artifact was verified).
    """
    copy = folder / f"{digest}{Path(source).suffix}"
    if _regular_file_sha256(copy) == digest:
        return copy
    # mkstemp opens with O_CREAT | O_EXCL and mode 0600 under a random name: nothing
    # planted can be followed or written through.
    handle, partial = tempfile.mkstemp(prefix=f".{digest}.", suffix=".partial", dir=folder)
    try:
        with os.fdopen(handle, "wb") as out, open(source, "rb") as data:
            shutil.copyfileobj(data, out)
        if _regular_file_sha256(Path(partial)) != digest:
            raise SparseccError(f"{source} changed while it was being loaded; load the artifact again.")
        os.replace(partial, copy)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(partial)
        raise
    return copy


def _regular_file_sha256(path: Path) -> str | None:
    """The sha256 of ``path`` when it is a regular file of this user (links not followed), else None."""
    try:
        handle = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    with os.fdopen(handle, "rb") as data:
        info = os.fstat(data.fileno())
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.getuid():
            return None
        return hashlib.file_digest(data, "sha256").hexdigest()


def check_host(path, target: dict) -> None:
    """Refuses an artifact built for another CPU: by LLVM's CPU name when the full TVM is
    loaded, else by the instruction-set flags it was built with."""
    built_for = target.get("mcpu")
    host = llvm_cpu_name()
    if built_for and host and built_for != host:
        raise SparseccError(f"{path} was compiled for CPU {built_for!r} but this machine is {host!r}; recompile it here.")
    missing = sorted(set(target.get("isa", [])) - set(isa_flags()))
    if missing and isa_flags():
        raise SparseccError(
            f"{path} was compiled for CPU {built_for!r}, which has instructions this machine lacks ({', '.join(missing[:4])}); recompile it here."
        )


def choose_cuda_compiler() -> None:
    """Makes TVM compile CUDA modules with nvcc when NVRTC's Python bindings are missing.

    TVM 0.27 compiles a module's CUDA source when the module is loaded on a GPU, with
    NVRTC through the ``cuda-bindings`` package by default; without that package, nvcc
    (``TVM_CUDA_COMPILE_MODE=nvcc``) is the way that works. A mode the user set is kept.
    """
    import importlib.util

    if importlib.util.find_spec("cuda") is None or importlib.util.find_spec("cuda.bindings") is None:
        if shutil.which("nvcc") is not None:
            os.environ.setdefault("TVM_CUDA_COMPILE_MODE", "nvcc")


def cuda_device(path, target: dict):
    """The first CUDA device, for an artifact of the cuda target.

    The library's CUDA source is compiled by TVM's runtime when it is loaded: NVRTC, or
    nvcc when ``TVM_CUDA_COMPILE_MODE=nvcc``.

    Raises:
        SparseccError: when this machine has no CUDA device, or its processor family is not
            the one the host code was built for.
    """
    import platform

    built_on = target.get("host_machine")
    if built_on and built_on != platform.machine():
        raise SparseccError(f"{path} holds host code for {built_on} processors but this machine is {platform.machine()}; "
                            "compile it on a machine of this kind.")
    device = _tvm().cuda(0)
    try:
        found = bool(device.exist)
    except Exception:  # a TVM runtime built without CUDA support
        found = False
    if not found:
        raise SparseccError(f"no CUDA device was found; {path} was compiled for NVIDIA GPUs ({target.get('arch', 'cuda')}) "
                            "and runs only on a machine with one.")
    choose_cuda_compiler()
    return device


class CompiledModel:
    """An artifact loaded for execution.

    Use :func:`runtime.load`; then ``model.run({"input_ids": array})`` returns a dict of
    output arrays.

    One loaded model may be shared by threads: the TVM virtual machine keeps per-call
    state, so calls are serialised by a lock (each thread gets correct results; they do
    not run at the same time).
    """

    def __init__(self, path: str | os.PathLike, manifest: Manifest, weight_cache: dict | None = None):
        tvm = _tvm()
        from tvm.runtime import vm as tvm_vm

        self.path = Path(path)
        self.manifest = manifest
        target = manifest.target.get("name")
        if target not in SUPPORTED_TARGETS:
            raise SparseccError(f"{path} was compiled for target {target!r}, which this runtime cannot run.")
        self.device = cuda_device(path, manifest.target) if target == "cuda" else tvm.cpu(0)
        if target == "cpu":
            check_host(path, manifest.target)
        self.lock = threading.Lock()
        self._weight_cache = {} if weight_cache is None else weight_cache
        try:
            library = load_library(self.path / manifest.library, manifest.files.get(manifest.library))
        except Exception as exc:  # a library that fails to load is a damaged artifact
            raise SparseccError(f"{path}: its compiled library cannot be loaded ({exc}).") from None
        self._vm = tvm_vm.VirtualMachine(library, self.device)
        self._weights = self._load_weights()

    def _load_weights(self) -> list:
        """The weights as TVM tensors; a weight another graph of the artifact already
        loaded (same bytes in the weights file) is the same tensor."""
        tvm = _tvm()
        weights_path = self.path / self.manifest.weights_file
        if not self.manifest.weights:
            return []
        blob = np.memmap(weights_path, dtype=np.uint8, mode="r")
        tensors = []
        for spec in self.manifest.weights:
            if spec.offset + spec.nbytes > blob.size:
                raise SparseccError(f"{self.path} is corrupt: weight {spec.name} lies past the end of {weights_path.name}.")
            key = (spec.offset, spec.nbytes, spec.dtype, spec.shape)
            if key not in self._weight_cache:
                array = np.frombuffer(blob, dtype=spec.dtype, count=int(np.prod(spec.shape)), offset=spec.offset)
                self._weight_cache[key] = tvm.runtime.tensor(array.reshape(spec.shape), self.device)
            tensors.append(self._weight_cache[key])
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
            check_range(spec.name, array, self.manifest.input_ranges.get(spec.name))
            if np.issubdtype(array.dtype, np.floating) and array.size and not np.isfinite(array).all():
                raise SparseccError(f"input {spec.name!r} holds NaN or infinite values.")
            arrays.append(np.ascontiguousarray(array))
        return arrays

    def call(self, args: list) -> list:
        """Calls the library on TVM tensors (inputs, then weights appended); returns the
        outputs as TVM tensors. Inputs are not checked: ``run`` is the checked entry."""
        with self.lock:
            try:
                result = self._vm["main"](*args, *self._weights)
            except (RuntimeError, ValueError, TypeError) as exc:
                # The library checks its parameters' count, shapes and dtypes against what
                # it was compiled for; a manifest describing others (edited, with its hash
                # redone) fails there, before any kernel runs.
                if "loc=param" not in str(exc) and "arguments were provided" not in str(exc):
                    raise
                detail = str(exc).splitlines()[0][:160]
                raise SparseccError(f"{self.path} is corrupt: its manifest's inputs or weights are not the ones its library "
                                    f"was compiled for ({detail}); compile it again.") from None
        return list(result) if len(self.manifest.outputs) > 1 else [result]

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Runs the model once; returns ``{output name: array}``."""
        tvm = _tvm()
        arrays = self._check_inputs(inputs)
        values = self.call([tvm.runtime.tensor(a, self.device) for a in arrays])
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


def check_range(name: str, array: np.ndarray, bounds) -> None:
    """Refuses integer values outside ``[low, high)`` (token ids past the embedding table
    would make the gather read out of bounds)."""
    if bounds is None or not array.size:
        return
    low, high = int(bounds[0]), int(bounds[1])
    smallest, largest = int(array.min()), int(array.max())
    if smallest < low or largest >= high:
        bad = smallest if smallest < low else largest
        raise SparseccError(f"input {name!r} holds {bad}, outside the valid range [{low}, {high - 1}].")


# target name -> "module:class" of the executor that runs its artifacts. Each class takes
# (path, manifest) and offers inputs, outputs, run(inputs) and time(inputs).
EXECUTORS = {
    "cpu": "runtime.executor:CompiledModel",
    "cuda": "runtime.executor:CompiledModel",
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
    if manifest.decoding:
        module, name = "runtime.decoder", "DecoderModel"
    return getattr(importlib.import_module(module), name)(path, manifest)
