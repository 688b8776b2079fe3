"""``sparsecc profile`` on CPU artifacts: per-operator time, gate sparsity, memory,
estimates on the edge-CPU hardware models, JSON and a self-contained HTML report."""

import json

import pytest

from compiler.cli import main
from compiler.profile import ProfileOptions, profile_artifact
from compiler.progress import SILENT
from runtime.errors import SparseccError


@pytest.fixture(scope="module")
def gated_step(tmp_path_factory, exported):
    """tiny-llama, one token, 50 % pruned, gates calibrated to 50 % on pydoc."""
    from compiler.driver import CompileOptions, compile_model

    path = tmp_path_factory.mktemp("profile") / "gated.sccx"
    compile_model(CompileOptions(str(exported("tiny-llama", 0.5, seq_len=1)), str(path), activation_sparsity=0.5,
                                 calib="pydoc", calib_tokens=256))
    return path


def test_cpu_hardware_models_carry_sources():
    from targets.hardware import available, load, require
    from targets.cpu.profile import DEFAULT_HARDWARE, HARDWARE_KEYS

    assert set(DEFAULT_HARDWARE) <= set(available("cpu"))
    for name in DEFAULT_HARDWARE:
        spec = load(name, "cpu")
        require(spec, HARDWARE_KEYS)
        for key in HARDWARE_KEYS:
            assert spec[key]["source"], (name, key)


def test_profile_reports_operators_gates_memory_and_estimates(gated_step, tmp_path):
    report, lines = profile_artifact(ProfileOptions(str(gated_step), json_path=str(tmp_path / "p.json"),
                                                    report_dir=str(tmp_path / "report")), SILENT)
    names = [entry["operator"] for entry in report["operators"]]
    assert any(name.startswith(("dual_matmul", "gated_matmul")) for name in names)
    assert abs(sum(entry["share"] for entry in report["operators"]) - 1.0) < 1e-6
    assert sum(entry["calls"] for entry in report["operators"]) == report["calls"]
    # Eight gates (q/k/v, o, gate/up, down in two layers), each reported beside its target.
    assert len(report["gates"]) == 8
    assert all(0.0 <= gate["sparsity"] <= 1.0 and gate["target"] == 0.5 for gate in report["gates"])
    assert report["weight_bytes"] > 0 and report["peak_rss_bytes"] > report["weight_bytes"]
    assert [e["hardware"] for e in report["estimates"]] == ["raspberry-pi-5", "jetson-orin-nano-cpu", "laptop-x86"]
    # The laptop has more bandwidth and FLOP/s than the Pi, so its estimate is lower.
    pi, _, laptop = (e["seconds"] for e in report["estimates"])
    assert 0 < laptop < pi
    assert json.loads((tmp_path / "p.json").read_text())["calls"] == report["calls"]
    html = (tmp_path / "report" / "index.html").read_text()
    assert html.count("data:image/png;base64,") == 3 and "<script" not in html
    assert any(line.startswith("estimate on raspberry-pi-5") for line in lines)


def test_profile_takes_one_named_model_or_a_file(compiled, tmp_path):
    report, _ = profile_artifact(ProfileOptions(str(compiled("tiny-llama", 0.0)), hardware=("laptop-x86",)), SILENT)
    assert [e["hardware"] for e in report["estimates"]] == ["laptop-x86"]
    assert report["gates"] == []
    with pytest.raises(SparseccError, match="unknown cpu hardware model 'pi-zero'"):
        profile_artifact(ProfileOptions(str(compiled("tiny-llama", 0.0)), hardware=("pi-zero",)), SILENT)
    broken = tmp_path / "broken.toml"
    broken.write_text('kind = "cpu"\nname = "broken"\n')
    with pytest.raises(SparseccError, match="missing key 'memory_bandwidth_gbs'"):
        profile_artifact(ProfileOptions(str(compiled("tiny-llama", 0.0)), hardware=(str(broken),)), SILENT)


def test_cli_profile_prints_and_writes(compiled, tmp_path, capsys):
    try:
        main(["profile", str(compiled("tiny-llama", 0.0)), "--hw", "raspberry-pi-5,laptop-x86", "--plot", str(tmp_path / "plots")])
    except SystemExit as exc:
        assert exc.code in (0, None)
    out = capsys.readouterr().out
    assert "estimate on raspberry-pi-5" in out and "estimate on laptop-x86" in out
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == ["estimates.png", "operators.png"]


def test_kernel_costs_come_from_the_symbols_every_format_included():
    """FLOPs per call: 2 m per stored weight (a BSR block is R x C of them; every weight
    for the dense and gated kernels, scaled by the active inputs), and bytes: the
    tensors, the gated kernel's weights scaled too. A name that is no kernel of ours (a
    TVM function, a gather) counts one FLOP per output element."""
    import numpy as np

    from targets.cpu.profile import _kernel_cost

    m, k, n = 2, 48, 64
    x, y = np.zeros((m, k), np.float32), np.zeros((m, n), np.float32)
    blocks = np.zeros((12, 16, 1), np.float32)
    args = [x, np.zeros(5, np.int32), np.zeros(12, np.int16), blocks, y]
    assert _kernel_cost(f"bsr_matmul_m{m}_k{k}_n{n}_b16x1_nnzb12_int16", args, None)[1] == 2.0 * m * 12 * 16 * 1
    values = np.zeros(100, np.float32)
    csr = [x, np.zeros(n + 1, np.int32), np.zeros(100, np.int16), values, y]
    assert _kernel_cost(f"csr_matmul_m{m}_k{k}_n{n}_nnz100_int16", csr, None) == (sum(a.nbytes for a in csr), 2.0 * m * 100)
    assert _kernel_cost(f"dense_matmul_m{m}_k{k}_n{n}", [x, np.zeros((4, k, 16), np.float32), y], None)[1] == 2.0 * m * k * n
    weight = np.zeros((k, n), np.float32)
    gated = [x, np.zeros(1, np.float32), weight, y]
    total, flops = _kernel_cost(f"gated_matmul_m{m}_k{k}_n{n}_scalar", gated, 0.25)
    assert flops == 2.0 * m * k * n * 0.25
    assert total == x.nbytes + 4 + y.nbytes + weight.nbytes * 0.25
    rows = [np.zeros(5, np.int64), np.zeros(n + 1, np.int32), np.zeros(100, np.int16), values, np.zeros((5, k), np.float32)]
    assert _kernel_cost(f"csr_gather_r5_k{k}_n{n}_nnz100_int16_int64", rows, None)[1] == 5 * k
    assert _kernel_cost("fused_add_multiply", [x, x], None) == (2 * x.nbytes, float(x.size))


def test_profile_charges_a_bsr_kernel_its_blocks_not_the_dense_flops(tmp_path):
    """A one-op model compiled to the 16x1 BSR kernel, 75 % of its blocks zero: its
    operator's FLOPs are 2 m nnzb R C, a quarter of the dense 2 m k n."""
    import numpy as np
    import onnx

    from compiler.driver import CompileOptions, compile_model
    from test_compile_models import _sparse_op_model

    rng = np.random.default_rng(0)
    weight_t = rng.standard_normal((64, 48)).astype(np.float32)  # W^T [N, K]: 16x1 blocks are 16 rows of a column
    weight_t *= np.repeat(rng.permutation(4 * 48).reshape(4, 48) < 48, 16, axis=0)
    model = _sparse_op_model("bsr", (16, 1), rows=1, weight=np.ascontiguousarray(weight_t.T))
    onnx.save(model, tmp_path / "bsr.onnx")
    compile_model(CompileOptions(str(tmp_path / "bsr.onnx"), str(tmp_path / "bsr.sccx")))
    report, _ = profile_artifact(ProfileOptions(str(tmp_path / "bsr.sccx"), hardware=("laptop-x86",)), SILENT)
    kernel = next(entry for entry in report["operators"] if entry["operator"].startswith("bsr_matmul"))
    blocks = int(next(a for a in model.graph.initializer if a.name == "w2").dims[0])  # values [nnzb, 16, 1]
    assert blocks == 48
    assert kernel["flops"] == 2.0 * 1 * blocks * 16 * 1 * kernel["calls"]
