"""CPU legalisation: linear layers become panel-packed matmuls and the CPU's sparse,
gated and dual-sparse kernels (``targets.legalize`` does the rewriting).

The private ops (domain ``ai.sparsecc.cpu``):

- ``PanelMatMul(x, pack(W))``: ``y = x @ W`` with ``pack`` the dense kernel's layout
  (``formats.panels``);
- ``CpuSparseMatMul``, ``CpuGatedMatMul``: ``targets.cpu.sparse_kernels``, on csr, bsr
  and bitmask weights and, behind a gate, the dense weight or the ``bitmask_rows`` or
  ``segments`` layout;
- ``CpuQuantMatMul(x, codes, scales[, mins])`` (attributes ``dtype, group, k, n``): ``y =
  x @ W`` with ``W`` a ``formats.quant`` weight in ``targets.cpu.quant_kernels``' layout;
- ``QuantGather(ids, codes, scales[, mins])`` (attributes as ``CpuQuantMatMul``'s): rows of
  an embedding table tied to a quantized output projection ``W' = E'^T``, dequantized from
  its stored arrays (``targets.cpu.quant_kernels.gather_rows``);
- ``PackedGather(pack(E^T), ids)``: rows of an embedding table ``E`` read from the packed
  tied output projection. Row ``v`` of ``E`` is column ``v`` of ``W = E^T``, which the
  panel layout ``[N / width, K, width]`` stores at ``[v // width, :, v % width]``.
- ``SparseGather(ids, encode(E^T))`` (attributes ``format, k, n``): the same for a tied
  table pruned with its projection and stored as the projection's csr or bitmask arrays,
  whose row ``v`` is row ``v`` of ``E`` (``sparse_kernels.csr_gather_func``,
  ``bitmask_gather_func``);
- ``DecodeAttention``: a decode step's attention over the filled cache slots
  (``targets.attention``, ``targets.cpu.attention``).

``COSTS`` are the CPU kernels' measured efficiencies, which the graph passes' format
choice uses (``passes.sparse_formats``).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

import formats
from passes.sparse_formats import KernelCosts
from targets.legalize import LIFT_MIN_BYTES, ROW_PRESERVING, SPARSE_MAX_ROWS, Backend, legalize as _legalize

DOMAIN = "ai.sparsecc.cpu"
PANEL_MATMUL = "PanelMatMul"
SPARSE_MATMUL = "CpuSparseMatMul"
GATED_MATMUL = "CpuGatedMatMul"
QUANT_MATMUL = "CpuQuantMatMul"
PACKED_GATHER = "PackedGather"
QUANT_GATHER = "QuantGather"
SPARSE_GATHER = "SparseGather"

__all__ = ["DOMAIN", "PANEL_MATMUL", "QUANT_MATMUL", "SPARSE_MATMUL", "GATED_MATMUL", "PACKED_GATHER", "QUANT_GATHER", "SPARSE_GATHER", "SPARSE_MAX_ROWS",
           "LIFT_MIN_BYTES", "ROW_PRESERVING", "BACKEND", "COSTS", "legalize"]

# Bytes per second each kernel streams relative to the dense kernel (1.0 = as fast per
# byte). Measured speedup over our dense kernel divided by the bytes ratio, batch 1,
# weights from DRAM (`sparsecc bench kernels`, 2048x5632 and 1536x576 on the development
# machine): csr 0.88-0.94, bsr16x1 0.80-0.99, bitmask 0.79 at 50-70 % (0.56 at 90 %),
# dual 0.83 against the gated dense kernel.
COSTS = KernelCosts(target="cpu", efficiency={"dense": 1.0, "csr": 0.9, "bsr": 0.9, "bitmask": 0.75},
                    gated_layout="bitmask_rows", gated_efficiency=0.8,
                    source="measured by sparsecc bench kernels on the development machine")


def _panel_matmul(x: str, packed: str, k: int, n: int, output: str, name: str) -> list[onnx.NodeProto]:
    return [helper.make_node(PANEL_MATMUL, [x, packed], [output], name=name + "_panel", domain=DOMAIN, k=k, n=n)]


def _quant_matmul(x: str, stored: list[str], quantized, output: str, name: str) -> list[onnx.NodeProto]:
    k, n = quantized.shape
    return [helper.make_node(QUANT_MATMUL, [x, *stored], [output], name=name + "_quant", domain=DOMAIN, k=k, n=n,
                             dtype=quantized.dtype, group=quantized.group)]


def _store_quantized(quantized) -> list[np.ndarray]:
    from targets.cpu import quant_kernels

    return quant_kernels.pack(quantized).arrays()


def _quant_gather(node: onnx.NodeProto, stored: list[str], quantized) -> onnx.NodeProto:
    k, n = quantized.shape
    return helper.make_node(QUANT_GATHER, [node.input[1], *stored], [node.output[0]], name=node.name, domain=DOMAIN,
                            k=k, n=n, dtype=quantized.dtype, group=quantized.group)


def _packed_gather(node: onnx.NodeProto, packed: str, table: np.ndarray) -> onnx.NodeProto:
    return helper.make_node(PACKED_GATHER, [packed, node.input[1]], [node.output[0]], name=node.name,
                            domain=DOMAIN, k=int(table.shape[1]), n=int(table.shape[0]))


def _sparse_gather(node: onnx.NodeProto, format: str, arrays: list[str], k: int, n: int) -> onnx.NodeProto:
    return helper.make_node(SPARSE_GATHER, [node.input[1], *arrays], [node.output[0]], name=node.name, domain=DOMAIN,
                            format=format, k=k, n=n)


BACKEND = Backend(name="cpu", domain=DOMAIN, sparse_op=SPARSE_MATMUL, gated_op=GATED_MATMUL, dense=_panel_matmul,
                  store_dense=lambda weight: formats.get("panels").encode(weight)[0],
                  pack_dual=formats.get(COSTS.gated_layout).encode, gather=_packed_gather, sparse_gather=_sparse_gather,
                  sparse_formats=COSTS.sparse_formats,
                  sparse_gather_formats=formats.formats_with_kernel("cpu", "gather", COSTS.sparse_formats),
                  pack_segments=formats.get("segments").encode, decode_attention=True,
                  quant_dense=_quant_matmul, store_quantized=_store_quantized, quant_gather=_quant_gather)


def legalize(model: onnx.ModelProto):
    """``targets.legalize.legalize`` with the CPU kernels."""
    return _legalize(model, BACKEND)
