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
