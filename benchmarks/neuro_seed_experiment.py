"""The seed experiment in shape: activation sparsity in a recurrent LM on the SENECA model.

    python benchmarks/neuro_seed_experiment.py [--workdir DIR] [--smollm2 PATH.onnx]
                                               [--json PATH] [--plot PATH.png]

After "Explore activation sparsity in recurrent LLMs for energy-efficient neuromorphic
computing" (arXiv 2501.16337: up to 63 % activation sparsity, energy and latency gains up
to about 1.9x on SENECA). The recurrent model is a byte-level GRU of our own (embedding
64, hidden 512, about 1.2 M weights), trained here for a short while on Python's pydoc
text so that its activations are those of a working model, not of random weights. Its
one-step graph (``input_ids``, ``h`` -> ``logits``, ``h_new``) is written as ONNX and
compiled for ``neuro:seneca`` with magnitude gates calibrated (on the GRU's own states over
pydoc text) to 0, 20, 40, 60 and 80 % activation sparsity on every linear input. Each
artifact runs event by event over held-out text, its state fed back step by step; the
profile gives energy and latency per token, and the byte-level loss says what the
sparsity costs in accuracy. With ``--smollm2`` (a one-token SmolLM2-135M export) the same
is done at 0 and 40 % for the transformer, beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TVM_NUM_THREADS", str(os.cpu_count() or 1))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

EMBED, HIDDEN, VOCAB = 64, 512, 256
SPARSITIES = (0.0, 0.2, 0.4, 0.6, 0.8)


def text_bytes() -> np.ndarray:
    from runtime.corpus import pydoc_text

    return np.frombuffer(pydoc_text().encode("utf-8", "replace"), np.uint8).astype(np.int64)


def train_gru(data: np.ndarray, steps: int, seed: int = 0) -> dict[str, np.ndarray]:
    """A byte-level GRU LM trained with truncated backpropagation; returns its weights."""
    import torch

    torch.manual_seed(seed)
    embed = torch.nn.Embedding(VOCAB, EMBED)
    gru = torch.nn.GRU(EMBED, HIDDEN, batch_first=True)
    head = torch.nn.Linear(HIDDEN, VOCAB)
    parameters = [*embed.parameters(), *gru.parameters(), *head.parameters()]
    optimiser = torch.optim.Adam(parameters, lr=3e-3)
    rng = np.random.default_rng(seed)
    batch, window = 16, 64
    for step in range(steps):
        starts = rng.integers(0, len(data) - window - 1, batch)
        chunk = torch.from_numpy(np.stack([data[s:s + window + 1] for s in starts]))
        out, _ = gru(embed(chunk[:, :-1]))
        loss = torch.nn.functional.cross_entropy(head(out).reshape(-1, VOCAB), chunk[:, 1:].reshape(-1))
        optimiser.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimiser.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"  GRU training step {step}: loss {loss.item():.3f} nats/byte", flush=True)
    return {
        "embedding": embed.weight.detach().numpy(),
        "w_ih": gru.weight_ih_l0.detach().numpy().T.copy(),  # [E, 3H], gate order r, z, n
        "w_hh": gru.weight_hh_l0.detach().numpy().T.copy(),  # [H, 3H]
        "b_ih": gru.bias_ih_l0.detach().numpy(),
        "b_hh": gru.bias_hh_l0.detach().numpy(),
        "w_out": head.weight.detach().numpy().T.copy(),  # [H, V]
        "b_out": head.bias.detach().numpy(),
    }


def gru_step_onnx(weights: dict[str, np.ndarray], path: Path) -> None:
    """One GRU step as ONNX: three linear layers (x, h, h_new inputs) and elementwise ops."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    h = HIDDEN
    nodes = [
        helper.make_node("Gather", ["embedding", "input_ids"], ["x3"]),
        helper.make_node("Reshape", ["x3", "shape_x"], ["x"]),
        helper.make_node("MatMul", ["x", "w_ih"], ["gi_raw"]),
        helper.make_node("Add", ["gi_raw", "b_ih"], ["gi"]),
        helper.make_node("MatMul", ["h", "w_hh"], ["gh_raw"]),
        helper.make_node("Add", ["gh_raw", "b_hh"], ["gh"]),
        helper.make_node("Split", ["gi", "thirds"], ["i_r", "i_z", "i_n"], axis=1),
        helper.make_node("Split", ["gh", "thirds"], ["h_r", "h_z", "h_n"], axis=1),
        helper.make_node("Add", ["i_r", "h_r"], ["r_in"]),
        helper.make_node("Sigmoid", ["r_in"], ["r"]),
        helper.make_node("Add", ["i_z", "h_z"], ["z_in"]),
        helper.make_node("Sigmoid", ["z_in"], ["z"]),
        helper.make_node("Mul", ["r", "h_n"], ["rh"]),
        helper.make_node("Add", ["i_n", "rh"], ["n_in"]),
        helper.make_node("Tanh", ["n_in"], ["n"]),
        helper.make_node("Sub", ["h", "n"], ["h_minus_n"]),
        helper.make_node("Mul", ["z", "h_minus_n"], ["z_term"]),
        helper.make_node("Add", ["n", "z_term"], ["h_new"]),  # (1 - z) * n + z * h
        helper.make_node("MatMul", ["h_new", "w_out"], ["logits_raw"]),
        helper.make_node("Add", ["logits_raw", "b_out"], ["logits"]),
    ]
    constants = {**weights, "shape_x": np.array([1, EMBED], np.int64), "thirds": np.array([h, h, h], np.int64)}
    graph = helper.make_graph(
        nodes, "gru_step",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, 1]),
         helper.make_tensor_value_info("h", TensorProto.FLOAT, [1, h])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, VOCAB]),
         helper.make_tensor_value_info("h_new", TensorProto.FLOAT, [1, h])],
        [numpy_helper.from_array(np.ascontiguousarray(v), k) for k, v in constants.items()],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10), path)


def gru_states(onnx_path: Path, data: np.ndarray) -> dict[str, np.ndarray]:
    """(input_ids, h) at every step of running the GRU over ``data``, for calibration."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    h = np.zeros((1, HIDDEN), np.float32)
    ids, states = [], []
    for byte in data:
        token = np.array([[byte]], np.int64)
        ids.append(token)
        states.append(h)
        h = session.run(["h_new"], {"input_ids": token, "h": h})[0]
    return {"input_ids": np.stack(ids), "h": np.stack(states)}


def run_recurrent(model, data: np.ndarray) -> tuple[list[dict], float]:
    """Runs the artifact over ``data`` feeding its state back; per-step reports and loss."""
    from targets.neuro.profile import simulate_report

    h = np.zeros((1, HIDDEN), np.float32)
    reports, losses = [], []
    for byte, following in zip(data[:-1], data[1:]):
        inputs = {"input_ids": np.array([[byte]], np.int64), "h": h}
        report = simulate_report(model, inputs)
        reports.append(report)
        outputs = model.run(inputs)  # the same run again, for the outputs (the counts are reset)
        logits = outputs["logits"][0].astype(np.float64)
        losses.append(np.log(np.exp(logits - logits.max()).sum()) + logits.max() - logits[following])
        h = outputs["h_new"]
    return reports, float(np.mean(losses))


def summarise(reports: list[dict], artifact_target: dict) -> dict:
    """Means over tokens; activation sparsity measured over all synaptic inputs and over
    the gated ones (a layer without a gate, like the output head, sees dense inputs)."""
    synaptic_inputs = sum(layer["shape"][0] for layer in artifact_target["layers"])
    events = np.mean([r["events"] for r in reports])
    gated = [i for i, layer in enumerate(artifact_target["layers"]) if layer["gate"] != "none"]
    gated_inputs = sum(artifact_target["layers"][i]["shape"][0] for i in gated)
    gated_events = np.mean([sum(r["layers"][i]["events"] for i in gated) for r in reports]) if gated else 0.0
    components = {c: float(np.mean([r["energy_by_component"][c] for r in reports])) for c in reports[0]["energy_by_component"]}
    return {"energy_j": float(np.mean([r["energy_j"] for r in reports])),
            "latency_s": float(np.mean([r["latency_s"] for r in reports])),
            "synaptic_ops": float(np.mean([r["synaptic_ops"] for r in reports])),
            "events": float(events), "measured_activation_sparsity": float(1 - events / synaptic_inputs),
            "gated_layers": len(gated), "gated_input_sparsity": float(1 - gated_events / gated_inputs) if gated else 0.0,
            "energy_by_component": components, "bottleneck": reports[0]["bottleneck"],
            "cores_used": reports[0]["cores_used"], "tokens": len(reports)}


def gru_experiment(work: Path, train_steps: int, eval_bytes: int) -> list[dict]:
    import runtime
    from compiler.driver import CompileOptions, compile_model
    from compiler.pipeline import sparse_onnx_dump

    data = text_bytes()
    split = int(len(data) * 0.9)
    cached = work / f"gru_weights_{train_steps}.npz"
    if cached.exists():
        weights = dict(np.load(cached))
    else:
        start = time.perf_counter()
        weights = train_gru(data[:split], train_steps)
        print(f"trained the GRU in {time.perf_counter() - start:.0f} s", flush=True)
        np.savez(cached, **weights)
    onnx_path = work / "gru_step.onnx"
    gru_step_onnx(weights, onnx_path)
    calibration = work / "gru_calibration.npz"
    np.savez(calibration, **gru_states(onnx_path, data[1000:1512]))
    held_out = data[split:split + eval_bytes + 1]
    rows = []
    for sparsity in SPARSITIES:
        artifact = work / f"gru_{int(sparsity * 100)}.sccx"
        gated = sparsity > 0
        compile_model(CompileOptions(str(onnx_path), str(artifact), "neuro:seneca",
                                     activation_sparsity=sparsity if gated else None,
                                     calib=str(calibration) if gated else None, dump_dir=str(work / f"dump{int(sparsity * 100)}")))
        model = runtime.load(artifact)
        check = _check_against_onnxruntime(model, sparse_onnx_dump(work / f"dump{int(sparsity * 100)}"), held_out[0])
        reports, loss = run_recurrent(model, held_out)
        row = {"model": "GRU (ours, trained on pydoc)", "activation_sparsity_target": sparsity,
               "loss_nats_per_byte": loss, "max_abs_error_vs_onnxruntime": check, **summarise(reports, model.manifest.target)}
        rows.append(row)
        print(f"GRU at {sparsity:.0%}: gated inputs {row['gated_input_sparsity']:.1%} sparse, "
              f"all inputs {row['measured_activation_sparsity']:.1%}, "
              f"{row['energy_j'] * 1e9:.1f} nJ and {row['latency_s'] * 1e6:.1f} us per token, loss {loss:.3f}, "
              f"error vs onnxruntime {check:.1e}", flush=True)
    return rows


def _check_against_onnxruntime(model, gated_onnx: Path, byte: int) -> float:
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    inputs = {"input_ids": np.array([[byte]], np.int64), "h": (rng.standard_normal((1, HIDDEN)) * 0.5).astype(np.float32)}
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    reference = ort.InferenceSession(str(gated_onnx), options, providers=["CPUExecutionProvider"]).run(None, inputs)
    ours = model.run(inputs)
    return float(max(np.abs(ours[name] - value).max() for name, value in zip(("logits", "h_new"), reference)))


def smollm2_experiment(work: Path, onnx_path: str, chips: int, tokens: int) -> list[dict]:
    import runtime
    from compiler.driver import CompileOptions, compile_model
    from compiler.export import load_tokenizer
    from runtime.corpus import pydoc_text
    from targets.neuro.profile import simulate_report

    ids = load_tokenizer("smollm2-135m")(pydoc_text()[20000:24000], return_tensors="np")["input_ids"][0, :tokens]
    rows = []
    for sparsity in (0.0, 0.4):
        artifact = work / f"smollm2_{int(sparsity * 100)}.sccx"
        gated = sparsity > 0
        if not artifact.exists():
            compile_model(CompileOptions(onnx_path, str(artifact), "neuro:seneca", chips=chips,
                                         activation_sparsity=sparsity if gated else None,
                                         calib="pydoc" if gated else None, calib_tokens=256))
        model = runtime.load(artifact)
        reports = []
        for token in ids:
            start = time.perf_counter()
            reports.append(simulate_report(model, {"input_ids": np.array([[token]], np.int64)}))
            host_seconds = time.perf_counter() - start
        row = {"model": "SmolLM2-135M (one-token graph, dense weights)", "activation_sparsity_target": sparsity,
               "host_seconds_per_token": host_seconds, **summarise(reports, model.manifest.target)}
        rows.append(row)
        print(f"SmolLM2 at {sparsity:.0%}: gated inputs {row['gated_input_sparsity']:.1%} sparse, "
              f"all inputs {row['measured_activation_sparsity']:.1%}, "
              f"{row['energy_j'] * 1e6:.1f} uJ and {row['latency_s'] * 1e3:.2f} ms per token on {row['cores_used']} cores; "
              f"{host_seconds:.1f} s of host time per token", flush=True)
        del model
    return rows


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    for axis, key, label in ((axes[0], "energy_j", "energy gain over 0 %"), (axes[1], "latency_s", "latency gain over 0 %")):
        for model, marker in (("GRU", "o-"), ("SmolLM2", "s")):
            series = [r for r in rows if r["model"].startswith(model)]
            if not series:
                continue
            base = next(r for r in series if r["activation_sparsity_target"] == 0.0)[key]
            x = [100 * r["gated_input_sparsity"] for r in series]
            y = [base / r[key] for r in series]
            axis.plot(x, y, marker, label=series[0]["model"])
            for xi, yi in zip(x, y):
                axis.annotate(f"{yi:.2f}x", (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ideal = np.linspace(0, 90, 50)
        axis.plot(ideal, 1 / (1 - ideal / 100), ":", color="grey", label="ideal 1 / (1 - s)")
        axis.axhline(1.9, color="tab:red", linewidth=0.8, linestyle="--", label="paper: up to about 1.9x")
        axis.set_xlabel("sparsity of the gated inputs, held-out text (%)")
        axis.set_ylabel(label)
        axis.set_ylim(0.9, 5.2)
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    figure.suptitle("neuro:seneca, per token (simulated)", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="neuro-seed")
    parser.add_argument("--train-steps", type=int, default=150)
    parser.add_argument("--eval-bytes", type=int, default=64)
    parser.add_argument("--smollm2", help="a one-token SmolLM2-135M ONNX export (sparsecc export smollm2-135m --seq-len 1)")
    parser.add_argument("--chips", type=int, default=40, help="SENECA chips for SmolLM2")
    parser.add_argument("--smollm2-tokens", type=int, default=4)
    parser.add_argument("--json")
    parser.add_argument("--plot")
    args = parser.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    rows = gru_experiment(work, args.train_steps, args.eval_bytes)
    if args.smollm2:
        rows += smollm2_experiment(work, args.smollm2, args.chips, args.smollm2_tokens)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    if args.plot:
        plot(rows, Path(args.plot))


if __name__ == "__main__":
    main()
