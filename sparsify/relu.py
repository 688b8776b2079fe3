"""``--activations relu``: SiLU becomes ReLU, whose natural zeros are the sparsity.

Every SwiGLU MLP's ``x * Sigmoid(x)`` becomes ``Relu(x)``; an exact gate (threshold 0) on
the down projection's input lets the compiled down projection skip the zeros. It takes no
level and no calibration data.
"""

from __future__ import annotations

import onnx
from onnx import helper

from compiler.progress import Progress
from sparsify.gates import gate_down_projections
from sparsify.graph import Mlp, linear_layers, require_mlps
from sparsify.methods import Method, SparsifyOptions


def silu_to_relu(model: onnx.ModelProto, blocks: list[Mlp]) -> None:
    """Replaces the SiLU (Sigmoid, Mul) of every block by a Relu, in one rewrite."""
    drop = {id(block.silu[0]) for block in blocks if block.silu}
    relus = {id(block.silu[1]): helper.make_node("Relu", [block.silu[0].input[0]], [block.act],
                                                 name=(block.silu[1].name or block.act) + "_relu")
             for block in blocks if block.silu}
    nodes = [relus.get(id(node), node) for node in model.graph.node if id(node) not in drop]
    del model.graph.node[:]
    model.graph.node.extend(nodes)


def gate(model: onnx.ModelProto, method: Method, options: SparsifyOptions, progress: Progress) -> dict:
    blocks = require_mlps(model, linear_layers(model), method.name, options.model)
    silu_to_relu(model, blocks)
    return gate_down_projections(model, [block.down.input for block in blocks],
                                 {block.act: {"threshold": None} for block in blocks})
