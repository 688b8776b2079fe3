"""CUDA legalisation: linear layers become matmuls on weights stored transposed, and the
CUDA sparse, gated and dual-sparse kernels (``targets.legalize`` does the rewriting).

Dense weights are stored as ``W^T`` ([N, K], one row per output), the layout TVM's dlight
GEMV and matmul rules read coalesced: ``y = x @ W`` becomes ``MatMul(x, Transpose(W^T))``,
and TVM fuses the transpose into the matmul's loads. An output projection tied to the
embedding table ``E`` stores ``W^T = E`` itself, so the embedding lookup reads the same
array (``Gather(E, ids)``) and the table is stored once.

The private ops (domain ``ai.sparsecc.cuda``) are ``CudaDenseMatMul`` and our kernels
``CudaSparseMatMul`` (csr and bsr) and ``CudaGatedMatMul`` (the dense weight or the
``bitmask_words`` layout; ``targets.cuda.sparse_kernels``); they only exist between this
pass and the TVM import. ``COSTS`` are the efficiencies the graph passes' format choice
uses for this target: it never picks a format these kernels do not take.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

import formats
from passes.sparse_formats import KernelCosts
from targets.legalize import Backend, legalize as _legalize

DOMAIN = "ai.sparsecc.cuda"
DENSE_MATMUL = "CudaDenseMatMul"
SPARSE_MATMUL = "CudaSparseMatMul"
GATED_MATMUL = "CudaGatedMatMul"

# Estimates, not measurements: no GPU has run these kernels in this repository (see the
# README's CUDA section). They come from the roofline model of ``targets.cuda.profile``:
# at batch <= 8 each of these kernels does at most 4 FLOPs per byte it reads, below the
# ridge point of the A100 and H100 models (about 6 and 12 FLOPs per byte at their
# efficiencies), so each streams its bytes at the rate the dense GEMV does: efficiency
# 1.0 per byte. What that model leaves out is charged as a discount, by judgment: csr
# gathers x through L1 one address per lane and fills the last warp step of each row only
# partly (0.85); bsr reads its blocks as coalesced runs but sums each output's lanes
# through shared memory (0.9); the dual-sparse kernel loads a word's bits and offset
# before its values, and a lane loads only where its bit is set (0.85, against the gated
# dense kernel). The bitmask format has no CUDA kernel, so it is never a candidate here.
COSTS = KernelCosts(target="cuda", efficiency={"dense": 1.0, "csr": 0.85, "bsr": 0.9},
                    gated_layout="bitmask_words", gated_efficiency=0.85,
                    source="estimated from the roofline model; no GPU has measured these kernels")


def _transposed_matmul(x: str, stored: str, k: int, n: int, output: str, name: str) -> list[onnx.NodeProto]:
    return [helper.make_node(DENSE_MATMUL, [x, stored], [output], name=f"{name}_dense", domain=DOMAIN, k=k, n=n)]


def _gather_rows(node: onnx.NodeProto, stored: str, table: np.ndarray) -> onnx.NodeProto:
    return helper.make_node("Gather", [stored, node.input[1]], [node.output[0]], name=node.name, axis=0)


BACKEND = Backend(name="cuda", domain=DOMAIN, sparse_op=SPARSE_MATMUL, gated_op=GATED_MATMUL, dense=_transposed_matmul,
                  store_dense=lambda weight: np.ascontiguousarray(weight.T), pack_dual=formats.get(COSTS.gated_layout).encode,
                  gather=_gather_rows, sparse_formats=COSTS.sparse_formats)


def legalize(model: onnx.ModelProto):
    """``targets.legalize.legalize`` with the CUDA kernels."""
    return _legalize(model, BACKEND)
