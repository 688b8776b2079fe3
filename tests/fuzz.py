"""A seeded fuzz of sparsecc: mutated ONNX models and mutated artifacts, each of which must
end in one clean ``SparseccError`` or in a correct result.

A case is a small ONNX model with one to three random mutations (a dimension, a dtype, a
renamed input, an op swapped or dropped, an opset, the weights' bytes, a flipped byte of
the file), loaded, inspected and, when accepted, compiled and run against onnxruntime; or
a copy of a compiled artifact whose manifest has a field set to a value of another type
(its content hash redone, as a crafted one would be: the schema must refuse it or the
result must not change) or to another value of the same type, or whose files have a byte
flipped (hash left alone, as an accident: it must be refused). Cases run in a worker
process that is restarted when it dies, so a segmentation fault is counted, not fatal;
a case that takes longer than ``CASE_SECONDS`` counts as a hang.

    python -m tests.fuzz --minutes 10 [--seed 0]

prints the counts: tried, refused cleanly, ran correctly, tracebacks, wrong results,
crashes and hangs (the last four must be 0).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import select
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

CASE_SECONDS = 60
# Results within this of onnxruntime's are correct: fp32 matmuls of 16 and 32 terms.
ATOL = 1e-4
BAD = ("traceback", "wrong result", "crash", "hang")
# Starts the worker's result lines (anything else it prints is not a result).
MARKER = "FUZZ-RESULT "


def base_model():
    """y = relu(x W1) W2 + b, with x of shape [1, 16]."""
    import onnx
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)
             for name, shape in (("W1", (16, 32)), ("W2", (32, 8)), ("b", (8,)))]
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "W2"], ["m"]), helper.make_node("Add", ["m", "b"], ["y"])]
    graph = helper.make_graph(nodes, "fuzz", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 16])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 8])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)


# --- making cases (in the parent) ------------------------------------------------------

ODD_SIZES = [0, -1, 1, 2, 3, 16, 2**31, 2**40]
ODD_VALUES = [None, True, -1, 0, 7, 2**63, 1.5, float("nan"), "", "x", "../../etc/passwd", [], [1, -2], {}, {"a": 1}]


def mutate_onnx(rng: random.Random) -> bytes:
    model = base_model()
    graph = model.graph
    names = ["x", "W1", "h", "r", "W2", "m", "b", "y", "nope"]
    for _ in range(rng.randint(1, 3)):
        kind = rng.randrange(10)
        if kind == 0:
            value = rng.choice([*graph.input, *graph.output])
            dims = value.type.tensor_type.shape.dim
            dims[rng.randrange(len(dims))].dim_value = max(rng.choice(ODD_SIZES), 0)
        elif kind == 1:
            tensor = rng.choice(graph.initializer)
            tensor.dims[rng.randrange(len(tensor.dims))] = max(rng.choice(ODD_SIZES), 0)
        elif kind == 2:
            target = rng.choice([*graph.initializer, *graph.input, *graph.output])
            if hasattr(target, "data_type"):
                target.data_type = rng.randrange(26)
            else:
                target.type.tensor_type.elem_type = rng.randrange(26)
        elif kind == 3:
            node = rng.choice(graph.node)
            node.input[rng.randrange(len(node.input))] = rng.choice(names)
        elif kind == 4:
            node = rng.choice(graph.node)
            node.output[0] = rng.choice(names)
        elif kind == 5:
            rng.choice(graph.node).op_type = rng.choice(["Relu", "Sigmoid", "MatMul", "Add", "Gemm", "Transpose",
                                                         "Gather", "Frobnicate"])
        elif kind == 6 and len(graph.node) > 1:
            del graph.node[rng.randrange(len(graph.node))]
        elif kind == 7:
            model.opset_import[0].version = rng.choice([1, 7, 13, 17, 21, 99])
        elif kind == 8:
            tensor = rng.choice(graph.initializer)
            data = tensor.raw_data
            tensor.raw_data = data[: rng.randrange(len(data))] if rng.random() < 0.5 else data + data[:64]
        else:
            graph.node.extend([graph.node[rng.randrange(len(graph.node))]])
    data = bytearray(model.SerializeToString())
    if rng.random() < 0.15:
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] = rng.randrange(256)
    return bytes(data)


def _paths(data, prefix=""):
    """Every (dotted path, container, key) in a JSON value."""
    if isinstance(data, dict):
        items = data.items()
    elif isinstance(data, list):
        items = enumerate(data)
    else:
        return
    for key, value in items:
        yield f"{prefix}{key}", data, key
        yield from _paths(value, f"{prefix}{key}.")


def mutate_artifact(rng: random.Random, base: Path, folder: Path) -> str:
    """Writes a mutated copy of ``base`` at ``folder``; returns what was done."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from runtime.artifact import CONTENT_SHA256, MANIFEST, write_manifest

    shutil.copytree(base, folder)
    data = json.loads((folder / MANIFEST).read_text())
    del data[CONTENT_SHA256]
    kind = rng.randrange(4)
    path, container, key = rng.choice(list(_paths(data)))
    if kind == 0:  # another type, hash redone: the schema must refuse it, or it is harmless
        container[key] = rng.choice([v for v in ODD_VALUES if type(v) is not type(container[key])])
        write_manifest(folder, data)
        return f"crafted {path}"
    if kind == 1:  # deleted, hash redone
        del container[key]
        write_manifest(folder, data)
        return f"deleted {path}"
    if kind == 2:  # a same-type edit, hash kept: an accident, which must be refused
        value = container[key]
        container[key] = (value + rng.choice([-1, 1, 64]) if type(value) is int
                          else value + "x" if isinstance(value, str) else [] if isinstance(value, list) else None)
        old_hash = json.loads((base / MANIFEST).read_text())[CONTENT_SHA256]  # not redone: an accident
        (folder / MANIFEST).write_text(json.dumps({**data, CONTENT_SHA256: old_hash}, indent=2))
        return f"edited {path}"
    name = rng.choice(sorted(p.name for p in folder.iterdir() if p.name != MANIFEST))
    blob = bytearray((folder / name).read_bytes())
    blob[rng.randrange(len(blob))] ^= 1 << rng.randrange(8)
    (folder / name).write_bytes(bytes(blob))
    return f"flipped a bit of {name}"


# --- running cases (in the worker) -----------------------------------------------------

def _reference(model_bytes: bytes, feeds: dict):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        return ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"]).run(None, feeds)
    except Exception:
        return None


def run_onnx_case(path: Path, work: Path) -> tuple[str, str]:
    import runtime
    from compiler import driver
    from compiler.onnx_io import load_model

    model = load_model(path)
    driver.inspect(str(path))
    artifact = work / "case.sccx"
    shutil.rmtree(artifact, ignore_errors=True)
    driver.compile_model(driver.CompileOptions(str(path), str(artifact)))
    compiled = runtime.load(artifact)
    feeds = {spec.name: np.random.default_rng(1).standard_normal(spec.shape).astype(spec.dtype)
             if spec.dtype.startswith("float") else np.zeros(spec.shape, spec.dtype) for spec in compiled.inputs}
    ours = compiled.run(feeds)
    reference = _reference(model.SerializeToString(), feeds)
    if reference is None:
        return "wrong result", "compiled and ran a model onnxruntime refuses"
    for value, expected in zip(ours.values(), reference):
        if value.shape != expected.shape or not np.allclose(value, expected, atol=ATOL, rtol=0, equal_nan=True):
            return "wrong result", f"differs from onnxruntime: {value.ravel()[:4]} vs {expected.ravel()[:4]}"
    return "ran correctly", ""


def run_artifact_case(path: Path, reference: Path) -> str:
    import runtime

    compiled = runtime.load(path)
    expected = dict(np.load(reference))
    feeds = {"x": np.random.default_rng(1).standard_normal((1, 16)).astype(np.float32)}
    ours = compiled.run(feeds)
    same = ours.keys() == expected.keys() and all(np.array_equal(ours[k], expected[k]) for k in ours)
    return "ran correctly" if same else "wrong result"


def worker() -> None:
    """Reads one case a line ({"kind", "path", ...}) from stdin; writes one result a line."""
    # The full TVM (with the compiler) first: a runtime call before any compile would load
    # it runtime-only (runtime/tvm_runtime.py), and the compiler cannot run in that process.
    import tvm  # noqa: F401

    from runtime.errors import SparseccError

    work = Path(tempfile.mkdtemp(prefix="sparsecc-fuzz-worker-"))
    for line in sys.stdin:
        case = json.loads(line)
        try:
            if case["kind"] == "onnx":
                outcome, detail = run_onnx_case(Path(case["path"]), work)
            else:
                outcome, detail = run_artifact_case(Path(case["path"]), Path(case["reference"])), ""
        except SparseccError as exc:
            outcome, detail = "refused cleanly", str(exc)
            if "\n" in detail:
                outcome = "traceback"
        except Exception:
            outcome, detail = "traceback", traceback.format_exc()
        print(MARKER + json.dumps({"outcome": outcome, "detail": detail[-600:]}), flush=True)
    shutil.rmtree(work, ignore_errors=True)


# --- the driver (in the parent) --------------------------------------------------------

class Worker:
    def __init__(self):
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "TVM_NUM_THREADS": "1"}
        self.process = subprocess.Popen([sys.executable, "-m", "tests.fuzz", "--worker"], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env,
                                        cwd=Path(__file__).resolve().parents[1])

    def ask(self, case: dict) -> dict:
        self.process.stdin.write(json.dumps(case) + "\n")
        self.process.stdin.flush()
        deadline = time.monotonic() + CASE_SECONDS
        while True:
            ready, _, _ = select.select([self.process.stdout], [], [], max(0.0, deadline - time.monotonic()))
            line = self.process.stdout.readline() if ready else ""
            if line.startswith(MARKER):
                return json.loads(line[len(MARKER):])
            if not ready or not line:  # no answer in time, or the worker died
                outcome = "hang" if not ready else "crash"
                self.close()
                return {"outcome": outcome, "detail": f"exit status {self.process.returncode}"}

    def close(self):
        self.process.kill()
        self.process.wait()


def fuzz(seconds: float, seed: int = 0, log=print, keep: Path | None = None) -> dict:
    """Runs cases for about ``seconds``; returns the counts and the bad cases (copied to
    ``keep``, when given, to be replayed)."""
    import onnx

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from compiler.driver import CompileOptions, compile_model
    import runtime

    rng = random.Random(seed)
    root = Path(tempfile.mkdtemp(prefix="sparsecc-fuzz-"))
    counts = {"tried": 0, "refused cleanly": 0, "ran correctly": 0, **{bad: 0 for bad in BAD}}
    bad_cases = []
    try:
        onnx.save(base_model(), root / "base.onnx")
        compile_model(CompileOptions(str(root / "base.onnx"), str(root / "base.sccx")))
        feeds = {"x": np.random.default_rng(1).standard_normal((1, 16)).astype(np.float32)}
        np.savez(root / "reference.npz", **runtime.load(root / "base.sccx").run(feeds))
        worker = Worker()
        end = time.monotonic() + seconds
        index = 0
        while time.monotonic() < end:
            index += 1
            if rng.random() < 0.5:
                path = root / f"case{index}.onnx"
                path.write_bytes(mutate_onnx(rng))
                case, what = {"kind": "onnx", "path": str(path)}, "mutated ONNX"
            else:
                path = root / f"case{index}.sccx"
                what = mutate_artifact(rng, root / "base.sccx", path)
                case = {"kind": "artifact", "path": str(path), "reference": str(root / "reference.npz")}
            if worker.process.poll() is not None:
                worker = Worker()
            result = worker.ask(case)
            counts["tried"] += 1
            counts[result["outcome"]] += 1
            if result["outcome"] in BAD:
                bad_cases.append({"case": index, "what": what, **result})
                log(f"case {index} ({what}): {result['outcome']}\n{result['detail']}")
                if keep is not None:
                    keep.mkdir(parents=True, exist_ok=True)
                    (shutil.copytree if path.is_dir() else shutil.copyfile)(path, keep / path.name)
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
        worker.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return {"counts": counts, "bad": bad_cases}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", type=Path, help="Copy the cases that went wrong here.")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker()
        return
    result = fuzz(args.minutes * 60, args.seed, keep=args.keep)
    print(json.dumps(result["counts"]))
    sys.exit(1 if any(result["counts"][bad] for bad in BAD) else 0)


if __name__ == "__main__":
    main()
