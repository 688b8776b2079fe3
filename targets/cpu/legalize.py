"""CPU legalisation: linear layers become panel-packed matmuls and the CPU's sparse,
gated and dual-sparse kernels (``targets.legalize`` does the rewriting).

The private ops (domain ``ai.sparsecc.cpu``):

- ``PanelMatMul(x, pack(W))``: ``y = x @ W`` with ``pack`` the dense kernel's layout
  (``targets.cpu.kernels.pack_dense_weight``);
- ``CpuSparseMatMul``, ``CpuGatedMatMul``: ``targets.cpu.sparse_kernels``;
- ``PackedGather(pack(E^T), ids)``: rows of an embedding table ``E`` read from the packed
  tied output projection. Row ``v`` of ``E`` is column ``v`` of ``W = E^T``, which the
  panel layout ``[N / width, K, width]`` stores at ``[v // width, :, v % width]``.
- ``SparseGather(ids, encode(E^T))`` (attributes ``format, k, n``): the same for a tied
  table pruned with its projection and stored as the projection's csr or bitmask arrays,
  whose row ``v`` is row ``v`` of ``E`` (``sparse_kernels.csr_gather_func``,
  ``bitmask_gather_func``);
- ``DecodeAttention``: a decode step's attention over the filled cache slots
  (``targets.attention``, ``targets.cpu.attention``).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from targets.cpu import kernels, sparse_kernels
from targets.legalize import LIFT_MIN_BYTES, ROW_PRESERVING, SPARSE_MAX_ROWS, Backend, legalize as _legalize

DOMAIN = "ai.sparsecc.cpu"
PANEL_MATMUL = "PanelMatMul"
SPARSE_MATMUL = "CpuSparseMatMul"
GATED_MATMUL = "CpuGatedMatMul"
PACKED_GATHER = "PackedGather"
SPARSE_GATHER = "SparseGather"

__all__ = ["DOMAIN", "PANEL_MATMUL", "SPARSE_MATMUL", "GATED_MATMUL", "PACKED_GATHER", "SPARSE_GATHER", "SPARSE_MAX_ROWS",
           "LIFT_MIN_BYTES", "ROW_PRESERVING", "BACKEND", "legalize"]


def _panel_matmul(x: str, packed: str, k: int, n: int, output: str, name: str) -> list[onnx.NodeProto]:
    return [helper.make_node(PANEL_MATMUL, [x, packed], [output], name=name + "_panel", domain=DOMAIN, k=k, n=n)]


def _packed_gather(node: onnx.NodeProto, packed: str, table: np.ndarray) -> onnx.NodeProto:
    return helper.make_node(PACKED_GATHER, [packed, node.input[1]], [node.output[0]], name=node.name,
                            domain=DOMAIN, k=int(table.shape[1]), n=int(table.shape[0]))


def _sparse_gather(node: onnx.NodeProto, format: str, arrays: list[str], k: int, n: int) -> onnx.NodeProto:
    return helper.make_node(SPARSE_GATHER, [node.input[1], *arrays], [node.output[0]], name=node.name, domain=DOMAIN,
                            format=format, k=k, n=n)


BACKEND = Backend(name="cpu", domain=DOMAIN, sparse_op=SPARSE_MATMUL, gated_op=GATED_MATMUL, dense=_panel_matmul,
                  store_dense=kernels.pack_dense_weight, pack_dual=sparse_kernels.pack_dual_weight, gather=_packed_gather,
                  sparse_gather=_sparse_gather, pack_segments=sparse_kernels.pack_segment_weight,
                  decode_attention=True)


def legalize(model: onnx.ModelProto):
    """``targets.legalize.legalize`` with the CPU kernels."""
    return _legalize(model, BACKEND)
