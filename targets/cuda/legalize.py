"""CUDA legalisation: linear layers become matmuls on weights stored transposed, and the
CUDA sparse, gated and dual-sparse kernels (``targets.legalize`` does the rewriting).

Dense weights are stored as ``W^T`` ([N, K], one row per output), the layout TVM's dlight
GEMV and matmul rules read coalesced: ``y = x @ W`` becomes ``MatMul(x, Transpose(W^T))``,
and TVM fuses the transpose into the matmul's loads. An output projection tied to the
embedding table ``E`` stores ``W^T = E`` itself, so the embedding lookup reads the same
array (``Gather(E, ids)``) and the table is stored once.

The private ops (domain ``ai.sparsecc.cuda``) are ``CudaDenseMatMul`` and our kernels
``CudaSparseMatMul`` and ``CudaGatedMatMul`` (``targets.cuda.sparse_kernels``); they only exist between this pass and the TVM import.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from targets.cuda import sparse_kernels
from targets.legalize import Backend, legalize as _legalize

DOMAIN = "ai.sparsecc.cuda"
DENSE_MATMUL = "CudaDenseMatMul"
SPARSE_MATMUL = "CudaSparseMatMul"
GATED_MATMUL = "CudaGatedMatMul"


def _transposed_matmul(x: str, stored: str, k: int, n: int, output: str, name: str) -> list[onnx.NodeProto]:
    return [helper.make_node(DENSE_MATMUL, [x, stored], [output], name=f"{name}_dense", domain=DOMAIN, k=k, n=n)]


def _gather_rows(node: onnx.NodeProto, stored: str, table: np.ndarray) -> onnx.NodeProto:
    return helper.make_node("Gather", [stored, node.input[1]], [node.output[0]], name=node.name, axis=0)


BACKEND = Backend(name="cuda", domain=DOMAIN, sparse_op=SPARSE_MATMUL, gated_op=GATED_MATMUL, dense=_transposed_matmul,
                  store_dense=lambda weight: np.ascontiguousarray(weight.T), pack_dual=sparse_kernels.pack_dual_weight,
                  gather=_gather_rows, sparse_formats=("csr", "bsr"))


def legalize(model: onnx.ModelProto):
    """``targets.legalize.legalize`` with the CUDA kernels."""
    return _legalize(model, BACKEND)
