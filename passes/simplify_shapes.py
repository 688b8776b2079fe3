"""Fix the input shapes and fold the shape arithmetic around them.

Graphs from ``torch.onnx.export(dynamo=True)`` compute reshape targets from the runtime
shape (``Shape -> Gather -> Concat -> Reshape``). TVM's importer cannot follow those
chains (notes/tvm-0.27.md, section 7), so the inputs get their concrete shapes and onnxslim
folds every subgraph that is constant once they are known (shape chains, transposes of
initializers).

Precondition: every symbolic input dimension has a value in ``input_shapes``.
Postcondition: same function on inputs of those shapes; no shape arithmetic left that
depends only on static shapes.
"""

from __future__ import annotations

import contextlib
import io

import onnx

from passes import sparse_ops
from passes.base import PassResult
from runtime.errors import SparseccError


def simplify_shapes(model: onnx.ModelProto, input_shapes: dict[str, list[int]]) -> PassResult:
    """Fixes ``input_shapes`` and constant-folds the model with onnxslim."""
    import onnxslim

    before = len(model.graph.node)
    spec = [f"{name}:{','.join(str(d) for d in shape)}" for name, shape in input_shapes.items()]
    # onnxslim rebuilds nodes without their function overload, which names the format
    # of an ai.sparsecc op; remember it by output name.
    overloads = {node.output[0]: node.overload for node in model.graph.node if node.overload}
    # onnxslim prints a summary table to stdout; the driver reports progress itself.
    with contextlib.redirect_stdout(io.StringIO()):
        try:
            slimmed = onnxslim.slim(model, input_shapes=spec, no_shape_infer=False)
        except Exception as exc:  # onnxslim's own failures on a graph it cannot rebuild
            slimmed, reason = None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
        else:
            reason = "it returned no model"
    if slimmed is None:
        raise SparseccError(f"the model's shapes cannot be simplified by onnxslim ({reason}); the graph is probably "
                            "malformed (onnxruntime may say more).")
    for node in slimmed.graph.node:
        if node.output and node.output[0] in overloads:
            node.overload = overloads[node.output[0]]
    sparse_ops.attach_reference_functions(slimmed)
    after = len(slimmed.graph.node)
    return PassResult(slimmed, True, [f"simplify_shapes: {before} -> {after} nodes with inputs {', '.join(spec)}."])
