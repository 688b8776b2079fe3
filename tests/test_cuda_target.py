"""The cuda target without a GPU: whole models compile to CUDA that nvcc accepts for
sm_80 and sm_90 within the architectures' limits; the same program built for the host
(our kernels serial, ``targets.cuda.simulate``) matches onnxruntime; profiles are
roofline estimates; the runtime refuses in one sentence without a device. The ``gpu``
tests run the artifacts on a GPU against onnxruntime and are skipped elsewhere."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

import runtime
from compiler.pipeline import sparse_onnx_dump
from conftest import onnxruntime_reference
from test_cli import assert_one_sentence_error, sparsecc
from test_compile_models import _sparse_op_model

NVCC = pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
TOLERANCE = 1e-4


def _compile(source, output, **options):
    from compiler.driver import CompileOptions, compile_model

    return compile_model(CompileOptions(str(source), str(output), target="cuda", explain=True, **options))


@pytest.fixture(scope="module")
def artifacts(exported, tmp_path_factory):
    """tiny-llama for cuda: dense (16-token prompt) and a one-token step with 70 %
    weights and 50 % activation sparsity (dual-sparse kernels)."""
    root = tmp_path_factory.mktemp("cuda")
    dense = _compile(exported("tiny-llama"), root / "dense.sccx")
    sparse = _compile(exported("tiny-llama", 0.7, seq_len=1), root / "sparse.sccx", activation_sparsity=0.5,
                      calib="pydoc", calib_tokens=256, dump_dir=str(root / "dump"))
    return {"dense": (root / "dense.sccx", dense), "sparse": (root / "sparse.sccx", sparse), "dump": root / "dump"}


def _manifest(path):
    return json.loads((path / "manifest.json").read_text())


def test_artifact_carries_cuda_source_and_costs(artifacts):
    from targets.cuda.codegen import kernel_report

    for name in ("dense", "sparse"):
        path, _ = artifacts[name]
        target = _manifest(path)["target"]
        assert target["name"] == "cuda" and target["arch"] == "sm_80"
        source = (path / target["source"]).read_text()
        assert kernel_report(source) == target["kernels"] and len(target["kernels"]) > 5
        assert all(op["bytes"] > 0 for op in target["operators"])
    sparse_target = _manifest(artifacts["sparse"][0])["target"]
    ours = [op for op in sparse_target["operators"] if op["kind"] == "dual"]
    assert len(ours) == 8, "every linear layer of the two blocks but the output projection is dual-sparse"
    assert any(k["name"].startswith("cuda_dual_matmul") for k in sparse_target["kernels"])


def test_sparse_layers_get_our_kernels(artifacts):
    _, summary = artifacts["sparse"]
    lines = [line for line in summary["explanations"] if line.startswith("cuda:")]
    assert sum("dual-sparse kernel" in line for line in lines) == 8, lines
    _, dense = artifacts["dense"]
    assert sum("-> dense kernel" in line for line in dense["explanations"]) == 15


@NVCC
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("name", ["dense", "sparse"])
def test_model_cuda_compiles_to_ptx_within_limits(artifacts, name, arch):
    from targets.cuda.codegen import compile_ptx, kernel_report, ptxas_usage, within_limits

    path, _ = artifacts[name]
    source = (path / "kernels.cu").read_text()
    ptx = compile_ptx(source, arch)
    report = kernel_report(ptx)
    assert [k["name"] for k in report] == [k["name"] for k in kernel_report(source)]
    usage = ptxas_usage(ptx, arch)
    for kernel in report:
        kernel.update(usage[kernel["name"]])
        assert kernel["spill_stores"] == 0, kernel
    assert within_limits(report, arch) == []


@pytest.mark.parametrize("format, block", [("csr", None), ("bsr", (16, 1)), ("bsr", (4, 4)), ("bitmask", None)])
@pytest.mark.parametrize("rows", [1, 3])
def test_sparse_ops_on_the_host_simulation_match_onnxruntime(tmp_path, monkeypatch, format, block, rows):
    import onnx

    import targets
    from targets.cuda.simulate import HostSimulatedCudaTarget

    monkeypatch.setattr(targets, "get_target", lambda spec, chips=1: HostSimulatedCudaTarget())
    path = tmp_path / "sparse.onnx"
    onnx.save(_sparse_op_model(format, block, rows=rows), path)
    summary = _compile(path, tmp_path / "s.sccx")
    expected = "csr sparse kernel" if format in ("csr", "bitmask") else "bsr sparse kernel"
    assert any(expected in line for line in summary["explanations"]), summary["explanations"]
    x = np.random.default_rng(1).standard_normal((rows, 48)).astype(np.float32)
    reference = onnxruntime_reference(path, {"x": x})[0]
    ours = runtime.load(tmp_path / "s.sccx").run({"x": x})["y"]
    np.testing.assert_allclose(ours, reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("prune, sparsity", [(0.0, None), (0.0, 0.5), (0.7, 0.5)])
def test_tiny_llama_on_the_host_simulation_matches_onnxruntime(exported, tmp_path, monkeypatch, prune, sparsity):
    import targets
    from targets.cuda.simulate import HostSimulatedCudaTarget

    monkeypatch.setattr(targets, "get_target", lambda spec, chips=1: HostSimulatedCudaTarget())
    source = exported("tiny-llama", prune, seq_len=1)
    dump = tmp_path / "dump"
    options = {"activation_sparsity": sparsity, "calib": "pydoc", "calib_tokens": 256} if sparsity else {}
    summary = _compile(source, tmp_path / "sim.sccx", dump_dir=str(dump), **options)
    kernel = {None: "-> dense kernel", 0.5: "gated kernel" if prune == 0 else "dual-sparse kernel"}[sparsity]
    assert any(kernel in line for line in summary["explanations"]), summary["explanations"]
    ids = np.array([[42]], np.int64)
    reference = onnxruntime_reference(sparse_onnx_dump(dump), {"input_ids": ids})[0]
    ours = runtime.load(tmp_path / "sim.sccx").run({"input_ids": ids})["logits"]
    np.testing.assert_allclose(ours, reference, atol=TOLERANCE, rtol=0)


def test_profile_is_a_labelled_roofline_estimate(artifacts, tmp_path, capsys):
    reports = {}
    for name in ("dense", "sparse"):
        path, _ = artifacts[name]
        out = tmp_path / f"{name}.json"
        code, printed, err = sparsecc(capsys, "profile", str(path), "--json", str(out), "--report", str(tmp_path / name))
        assert code == 0, err
        assert "ESTIMATES" in printed
        reports[name] = json.loads(out.read_text())
        assert (tmp_path / name / "index.html").read_text().count("estimate") >= 2
    for report in reports.values():
        assert report["estimate_only"] is True
        assert [e["hardware"] for e in report["estimates"]] == ["jetson-orin-nano-gpu", "a100", "h100"]
        times = {e["hardware"]: e["seconds"] for e in report["estimates"]}
        # More bandwidth, less time: the roofline's ordering of the three devices.
        assert times["jetson-orin-nano-gpu"] > times["a100"] > 0 and times["h100"] <= times["a100"]
        assert report["bytes_per_run"] == pytest.approx(sum(op["bytes"] for op in report["operators"]))
    sparse = reports["sparse"]
    assert sparse["gated_active_fraction"] == pytest.approx(0.5)
    dual = [op for op in sparse["operators"] if op["kind"] == "dual"]
    recorded = {op["name"]: op for op in _manifest(artifacts["sparse"][0])["target"]["operators"] if op["kind"] == "dual"}
    for op in dual:
        one = recorded[op["operator"]]
        # Half the weight rows are read: the weight bytes count half.
        assert op["bytes"] == pytest.approx(op["calls"] * (one["bytes"] - one["weight_bytes"] / 2))


def test_profile_refuses_a_cpu_hardware_model(artifacts, capsys):
    code, _, err = sparsecc(capsys, "profile", str(artifacts["dense"][0]), "--hw", "raspberry-pi-5")
    assert_one_sentence_error(code, err, "not a 'gpu' one")


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="this machine has a GPU")
def test_run_without_a_gpu_says_so(artifacts, tmp_path, capsys):
    np.save(tmp_path / "ids.npy", np.zeros((1, 16), np.int64))
    code, _, err = sparsecc(capsys, "run", str(artifacts["dense"][0]), "--input", f"input_ids={tmp_path / 'ids.npy'}",
                            "-o", str(tmp_path / "out.npz"))
    assert_one_sentence_error(code, err, "no CUDA device was found")
    assert not (tmp_path / "out.npz").exists()


def test_bad_cuda_requests_get_one_sentence(exported, tmp_path, capsys, decoder):
    code, _, err = sparsecc(capsys, "compile", str(exported("tiny-llama")), "-t", "cuda:sm_75", "-o", str(tmp_path / "x.sccx"))
    assert_one_sentence_error(code, err, "unknown CUDA architecture 'sm_75'")
    code, _, err = sparsecc(capsys, "compile", str(decoder[0]), "-t", "cuda", "-o", str(tmp_path / "d.sccx"))
    assert_one_sentence_error(code, err, "not built for the cuda target")
    assert not (tmp_path / "x.sccx").exists() and not (tmp_path / "d.sccx").exists()


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["dense", "sparse"])
def test_on_a_gpu_matches_onnxruntime(artifacts, name):
    path, _ = artifacts[name]
    model = runtime.load(path)
    spec = model.inputs[0]
    ids = np.random.default_rng(0).integers(0, 512, size=spec.shape).astype(np.int64)
    reference_model = sparse_onnx_dump(artifacts["dump"]) if name == "sparse" else _manifest(path)["summary"]["source"]
    reference = onnxruntime_reference(reference_model, {spec.name: ids})[0]
    np.testing.assert_allclose(model.run({spec.name: ids})["logits"], reference, atol=TOLERANCE, rtol=0)


@pytest.mark.model
@pytest.mark.slow
def test_smollm2_sparse_gated_step_for_cuda(tmp_path, monkeypatch):
    """SmolLM2-135M, 50 % magnitude weights + 40 % gates, one token, for cuda: 120 dual-sparse
    kernels, PTX for sm_90 within limits, and the host simulation against onnxruntime on the
    same gated sparse ONNX (tolerance as in test_smollm2.py: logits reach ~40, 2e-3 absolute)."""
    import targets
    from compiler.export import ExportOptions, export
    from targets.cuda.codegen import compile_ptx, kernel_report, within_limits
    from targets.cuda.simulate import HostSimulatedCudaTarget

    onnx_path = tmp_path / "step.onnx"
    export(ExportOptions("smollm2-135m", str(onnx_path), prune_magnitude=0.5, seq_len=1), progress=lambda *_: None)
    options = {"activation_sparsity": 0.4, "calib": "pydoc", "calib_tokens": 128}
    summary = _compile(onnx_path, tmp_path / "cuda.sccx", **options)
    assert sum("dual-sparse kernel" in line for line in summary["explanations"]) == 120
    if shutil.which("nvcc"):
        assert within_limits(kernel_report(compile_ptx((tmp_path / "cuda.sccx" / "kernels.cu").read_text(), "sm_90")), "sm_90") == []
    monkeypatch.setattr(targets, "get_target", lambda spec, chips=1: HostSimulatedCudaTarget())
    dump = tmp_path / "dump"
    _compile(onnx_path, tmp_path / "sim.sccx", dump_dir=str(dump), **options)
    ids = np.array([[504]], np.int64)
    reference = onnxruntime_reference(sparse_onnx_dump(dump), {"input_ids": ids})[0]
    ours = runtime.load(tmp_path / "sim.sccx").run({"input_ids": ids})["logits"]
    np.testing.assert_allclose(ours, reference, atol=2e-3, rtol=0)
    assert ours.argmax() == reference.argmax()


def test_our_kernels_flops_come_from_their_symbols():
    """2 m per stored weight (a bsr block is R x C of them), 2 m k n for the gated kernel;
    TVM's functions and the CPU's kernels are not ours here."""
    from targets.cuda.target import _our_kernel_flops

    assert _our_kernel_flops("cuda_bsr_matmul_m2_k48_n64_b16x1_nnzb12_int16") == ("bsr", 2.0 * 2 * 12 * 16)
    assert _our_kernel_flops("cuda_csr_matmul_m1_k48_n64_nnz100_int32") == ("csr", 2.0 * 100)
    assert _our_kernel_flops("cuda_gated_matmul_m3_k48_n64_scalar") == ("gated", 2.0 * 3 * 48 * 64)
    assert _our_kernel_flops("cuda_dual_matmul_m1_k48_n64_nnz700_channel") == ("dual", 2.0 * 700)
    assert _our_kernel_flops("fused_matmul_add") == (None, None)
    assert _our_kernel_flops("csr_matmul_m1_k48_n64_nnz100_int32") == (None, None)
