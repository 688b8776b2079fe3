"""Legalisation shared by the TVM targets: linear layers become the target's kernels and
weights leave the graph.

Math: ``y = x @ W`` (``MatMul``) and ``y = x @ op(B) + C`` (``Gemm`` with alpha = beta = 1)
with a constant 2-D weight become the target's dense kernel on W in the target's layout
(``Backend.dense``), ``[+ C]``; ``ai.sparsecc`` ops become the target's sparse, gated and
dual-sparse kernels for decode-sized matmuls (at most ``Backend.max_rows`` rows) and the
dense kernel on the decoded weight otherwise. An output projection tied to the embedding
table shares its stored copy with the lookup: the dense kernel's layout, or, when the
table was pruned with it and a sparse kernel reads it, the sparse arrays, which then serve
every row count. The target's ops live in a private domain (``Backend.domain``) between
this pass and the TVM import; they never appear in a model a user sees.

Every kernel weight, and every other floating-point initializer of at least
``LIFT_MIN_BYTES``, is moved from the initializers to the graph inputs so that it is stored
in the artifact's weights file and passed to the library at run time, not compiled into
the library (which would make LLVM build a 500 MB object for SmolLM2).

Precondition: input shapes fixed and constants folded (``compiler.simplify``).
Postcondition: the graph's inputs are the user's inputs followed by the lifted weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import onnx
from onnx import helper, numpy_helper

import formats
from passes.analyze_sparsity import constant_weight
from targets.attention import fuse_decode_attention
from passes import sparse_ops
from passes.base import Graph, attribute, gemm_refusal, node_label, remove_unused_initializers
from passes.quantized_weights import Dequantized, matmul_nbits_weight, quantized_weight
from runtime.errors import SparseccError

# The most rows of x a sparse or gated kernel takes (decode, small batches).
SPARSE_MAX_ROWS = 8
# The gated op's ``dual`` attribute: a dense weight, ``Backend.pack_dual``'s arrays or
# ``Backend.pack_segments``'s.
DUAL_NONE, DUAL_BITMASK, DUAL_SEGMENTS = 0, 1, 2
LIFT_MIN_BYTES = 64 * 1024


@dataclass(frozen=True)
class Backend:
    """What a target's kernels look like to the shared legalisation.

    Attributes:
        name: the target's name, in explanations.
        domain: the private ONNX domain of the target's ops.
        sparse_op, gated_op: op types of the sparse and of the gated / dual-sparse kernel;
            their attributes are ``format, k, n[, block]`` and ``k, n, dual`` (``DUAL_*``).
        dense: ``(x, stored, k, n, output, name) -> nodes`` for ``y = x @ W`` where
            ``stored`` is the lifted name of ``store_dense(W)``.
        store_dense: W [K, N] -> the array the dense kernel reads.
        pack_dual: W [K, N] -> the dual-sparse kernel's arrays (its layout's ``encode``
            in ``formats``).
        gather: ``(node, stored, table) -> node`` reading the rows of an embedding table
            from the stored copy of a tied output projection (``table.T == W``), or None
            when the target cannot share them.
        sparse_gather: ``(node, format, arrays, k, n) -> node`` reading the rows of an
            embedding table [n, k] from the lifted sparse arrays (``arrays``, in
            ``encode`` order) of a tied output projection, or None when the target has no
            such kernel (the table is then stored beside the projection's arrays).
    """

    name: str
    domain: str
    sparse_op: str
    gated_op: str
    dense: Callable[[str, str, int, int, str, str], list[onnx.NodeProto]]
    store_dense: Callable[[np.ndarray], np.ndarray]
    pack_dual: Callable[[np.ndarray], list[np.ndarray]]
    gather: Callable[[onnx.NodeProto, str, np.ndarray], onnx.NodeProto] | None = None
    sparse_gather: Callable[[onnx.NodeProto, str, list[str], int, int], onnx.NodeProto] | None = None
    max_rows: int = SPARSE_MAX_ROWS
    #: formats the sparse kernel takes (the target's ``KernelCosts.sparse_formats``, so
    #: the graph passes choose no other); a weight in another is re-encoded as csr.
    sparse_formats: tuple[str, ...] = ("csr", "bsr", "bitmask")
    #: formats ``sparse_gather`` reads; a tied table in another is re-encoded as csr.
    sparse_gather_formats: tuple[str, ...] = ("csr", "bitmask")
    #: W [K, N] -> the arrays of a dual-sparse kernel over windows of columns, used
    #: instead of ``pack_dual`` when they are fewer bytes (block-pruned weights), or None.
    pack_segments: Callable[[np.ndarray], list[np.ndarray]] | None = None
    #: whether the target has a ``DecodeAttention`` kernel (``targets.attention``).
    decode_attention: bool = False
    #: ``(x, stored, quantized, output, name) -> nodes`` for ``y = x @ W`` with ``W`` a
    #: ``formats.quant.Quantized`` weight whose arrays ``store_quantized`` gave and
    #: ``stored`` names; None when the target has no quantized kernels (such weights
    #: are then dequantized to float32 for the dense kernel).
    quant_dense: Callable[[str, list[str], object, str, str], list[onnx.NodeProto]] | None = None
    store_quantized: Callable[[object], list[np.ndarray]] | None = None
    #: ``(node, stored, quantized) -> node`` reading rows of ``W'^T`` (an embedding table
    #: tied to a quantized output projection) from its stored arrays, or None.
    quant_gather: Callable[[onnx.NodeProto, list[str], object], onnx.NodeProto] | None = None


def _gemm_weight(node: onnx.NodeProto, graph: Graph) -> tuple[np.ndarray, str] | str:
    refusal = gemm_refusal(node)
    if refusal:
        return refusal
    found = constant_weight(node.input[1], graph)
    if found is None:
        return graph.why_not_constant(node.input[1])
    weight, name = found
    return (weight.T if attribute(node, "transB", 0) else weight), name


def _linear_weight(node: onnx.NodeProto, graph: Graph) -> tuple[np.ndarray, str] | str:
    """The [K, N] fp32 weight of a linear node, or why it is not packable.

    The weight may be an initializer or reach the node through a Transpose or a
    ``weight * mask`` product of initializers (``passes.analyze_sparsity.constant_weight``).
    """
    if node.op_type == "Gemm":
        found = _gemm_weight(node, graph)
    else:
        found = constant_weight(node.input[1], graph) or graph.why_not_constant(node.input[1])
    if isinstance(found, str):
        return found
    weight, name = found
    if weight.ndim != 2:
        return f"weight {name} is {weight.ndim}-D, not a matrix"
    if weight.dtype != np.float32:
        return f"weight {name} is {weight.dtype}; the kernels take float32"
    return found


def _gate_as_standard_ops(gate: onnx.NodeProto) -> list[onnx.NodeProto]:
    """``x * (|x| > t)`` (or ``relu(x)``) in standard ops, for TVM to fuse with its neighbours."""
    x, y, stem = gate.input[0], gate.output[0], gate.name or gate.output[0]
    if gate.overload == "relu":
        return [helper.make_node("Relu", [x], [y], name=stem)]
    return [
        helper.make_node("Abs", [x], [f"{stem}_abs"], name=f"{stem}_abs"),
        helper.make_node("Greater", [f"{stem}_abs", gate.input[1]], [f"{stem}_active"], name=f"{stem}_active"),
        helper.make_node("Cast", [f"{stem}_active"], [f"{stem}_mask"], to=onnx.TensorProto.FLOAT, name=f"{stem}_mask"),
        helper.make_node("Mul", [x, f"{stem}_mask"], [y], name=stem),
    ]


# Ops whose output has the rows (all but the last dimension) of their first input (Split
# and Slice as the fused gate/up projection uses them: along the last axis). A wrong
# guess would only pick a slower kernel: every kernel is built for the real shape.
ROW_PRESERVING = {"Mul", "Add", "Sub", "Div", "Sigmoid", "Relu", "Tanh", "Neg", "Abs", "Cast", "Erf", "Gelu",
                  "MatMul", "Gemm", "SparseMatMul", "GatedMatMul", "ActivationGate", "Identity", "Split", "Slice"}


def _rows(model: onnx.ModelProto, tensor: str, depth: int = 8) -> int | None:
    """Rows of the matmul reading ``tensor`` (product of all but its last dimension).

    A pass that changes a tensor's last dimension (``drop_dead_neurons``) drops its shape
    information; the rows then come from the first input of the ops that made it.
    """
    for info in list(model.graph.value_info) + list(model.graph.input):
        if info.name == tensor:
            dims = [d.dim_value for d in info.type.tensor_type.shape.dim]
            if dims and all(d > 0 for d in dims):
                return int(np.prod(dims[:-1]))
    producer = next((node for node in model.graph.node if tensor in node.output), None)
    if depth and producer is not None and producer.op_type in ROW_PRESERVING and producer.input:
        return _rows(model, producer.input[0], depth - 1)
    return None


def _block(node: onnx.NodeProto, format: str) -> tuple[int, int] | None:
    """The block shape of a sparse op's weight, for a format that has one."""
    return tuple(int(d) for d in attribute(node, "block")) if formats.get(format).takes_block else None


def _decode(node: onnx.NodeProto, arrays: list[np.ndarray], format: str) -> np.ndarray:
    """The dense [K, N] weight of a sparse op's arrays."""
    k, n = (int(d) for d in attribute(node, "shape"))
    return formats.get(format).decode(arrays, (k, n), _block(node, format))


def _sparse_kernel(node: onnx.NodeProto, arrays: list[np.ndarray], format: str, readable: tuple[str, ...], backend: Backend,
                   lift, explanations: list[str], why: str = "") -> tuple[onnx.NodeProto, str, list[str]]:
    """The target's sparse kernel node for a SparseMatMul whose weight ``arrays`` are in
    ``format``, re-encoded as csr when ``format`` is not among ``readable`` (a model whose
    formats were chosen for another target); returns the node, the format it reads and
    the lifted names of its arrays."""
    label = node_label(node)
    k, n = (int(d) for d in attribute(node, "shape"))
    block = _block(node, format)
    if format not in readable:
        arrays, block = formats.get("csr").encode(_decode(node, arrays, format)), None
        explanations.append(f"{backend.name}: {label} re-encoded from {format} to csr (the kernels reading it take "
                            f"{', '.join(readable)}).")
        format = "csr"
    names = [lift(array, f"{node.input[-1]}:{part}") for array, part in zip(arrays, ("a", "b", "c"))]
    attrs = {"format": format, "k": k, "n": n}
    if block:
        attrs["block"] = list(block)
    explanations.append(f"{backend.name}: {label} [{k}x{n}] -> {format} sparse kernel{why}.")
    kernel = helper.make_node(backend.sparse_op, [node.input[0], *names], [node.output[0]], name=label,
                              domain=backend.domain, **attrs)
    return kernel, format, names


def _legalize_sparse_op(node: onnx.NodeProto, model: onnx.ModelProto, graph: Graph, backend: Backend, dense_matmul,
                        lift, explanations: list[str]) -> list[onnx.NodeProto]:
    """Nodes that compute an ``ai.sparsecc`` op with the target's kernels.

    Sparse and gated kernels serve decode-sized matmuls (at most ``backend.max_rows`` rows),
    where reading fewer bytes is what makes them faster; a larger matmul (a prompt) is
    compute-bound, and the dense panel kernel on the decoded weight does it better.
    """
    label = node_label(node)
    if node.op_type == "ActivationGate":
        return _gate_as_standard_ops(node)
    if node.op_type not in ("SparseMatMul", "GatedMatMul"):
        raise SparseccError(f"the {backend.name} target has no kernel for {sparse_ops.DOMAIN}.{node.op_type}.")
    gated = node.op_type == "GatedMatMul"
    mode, format, weight_inputs = sparse_ops.weight_operands(node)
    arrays = [graph.constant(name) for name in weight_inputs]
    if any(array is None for array in arrays):
        raise SparseccError(f"{label}: its weight arrays must be initializers.")
    k, n = (int(d) for d in attribute(node, "shape"))
    rows = _rows(model, node.input[0])
    source = weight_inputs[-1]
    x = node.input[0]
    # An all-zero weight has empty arrays, which TVM cannot take as parameters; such a
    # layer is rare and cheap through the dense kernel.
    empty = any(array.size == 0 for array in arrays)
    if rows is not None and rows <= backend.max_rows and not empty:
        if not gated:
            return [_sparse_kernel(node, arrays, format, backend.sparse_formats, backend, lift, explanations)[0]]
        threshold = node.input[1] if mode == "threshold" else _zero_threshold(model)
        weight = _decode(node, arrays, format)
        if format == "dense":
            names = [lift(weight, source)]
            explanations.append(f"{backend.name}: {label} [{k}x{n}] -> gated kernel (skips the weight rows of inactive inputs).")
            dual = DUAL_NONE
        else:
            packed, dual, kind = backend.pack_dual(weight), DUAL_BITMASK, "bitmask rows"
            if backend.pack_segments is not None and n >= 16:
                segments = backend.pack_segments(weight)
                if sum(a.nbytes for a in segments) < sum(a.nbytes for a in packed):
                    packed, dual, kind = segments, DUAL_SEGMENTS, "windows of 16 columns"
            names = [lift(array, f"{source}:dual{i}") for i, array in enumerate(packed)]
            explanations.append(f"{backend.name}: {label} [{k}x{n}] -> dual-sparse kernel over {kind} "
                                f"(inactive inputs and zero weights skipped).")
        return [helper.make_node(backend.gated_op, [x, threshold, *names], [node.output[0]], name=label, domain=backend.domain,
                                 k=k, n=n, dual=dual)]
    weight = _decode(node, arrays, format)
    nodes = []
    if gated:
        # The gate runs as its own elementwise op in front of the dense kernel.
        x = node.output[0] + "_gated_input"
        nodes.extend(_gate_as_standard_ops(sparse_ops.activation_gate_node(
            node.input[0], node.input[1] if mode == "threshold" else None, x, mode, name=label + "_gate")))
    nodes.extend(dense_matmul(x, weight, (weight_inputs[0], False), source, node.output[0], node.name or node.output[0]))
    if empty:
        why = "all its weights are zero, and TVM takes no empty arrays"
    elif rows is None:
        why = f"its rows are unknown, so it may be more than the {backend.max_rows} the sparse kernels take"
    else:
        why = f"{rows} rows, more than the {backend.max_rows} the sparse kernels take: a prompt-sized matmul is compute-bound"
    explanations.append(f"{backend.name}: {label} ({node.op_type} {node.overload}) [{k}x{n}] -> dense kernel on the decoded weight "
                        f"({why}).")
    return nodes


def _row_gather(node: onnx.NodeProto) -> bool:
    """Whether ``node`` looks up rows of a table (an embedding lookup)."""
    return node.op_type == "Gather" and node.domain in ("", "ai.onnx") and attribute(node, "axis", 0) == 0


def _tied_sparse_weights(model: onnx.ModelProto, graph: Graph, backend: Backend) -> dict[str, list[str]]:
    """Output projections pruned together with the embedding table they are tied to:
    for each SparseMatMul whose weight ``W`` is ``E^T`` for a table ``E`` that a Gather
    looks up, the outputs of those Gathers, keyed by the SparseMatMul's output. Empty when
    the target has no sparse gather."""
    if backend.sparse_gather is None:
        return {}
    tables = [(node.output[0], graph.constant(node.input[0])) for node in model.graph.node if _row_gather(node)]
    tables = [(output, table) for output, table in tables if table is not None and table.ndim == 2 and table.dtype == np.float32]
    tied: dict[str, list[str]] = {}
    for node in model.graph.node:
        if node.domain != sparse_ops.DOMAIN or node.op_type != "SparseMatMul":
            continue
        k, n = (int(d) for d in attribute(node, "shape"))
        candidates = [(output, table) for output, table in tables if table.shape == (n, k)]
        arrays = [graph.constant(name) for name in sparse_ops.weight_operands(node)[2]]
        # An all-zero weight has empty arrays, which TVM cannot take as parameters.
        if not candidates or any(array is None or array.size == 0 for array in arrays):
            continue
        weight_t = _decode(node, arrays, node.overload).T
        gathers = [output for output, table in candidates if np.array_equal(weight_t, table)]
        if gathers:
            tied[node.output[0]] = gathers
    return tied


def _gather_from_stored(node: onnx.NodeProto, graph: Graph, backend: Backend, stored_weights: list[tuple[np.ndarray, str]],
                        sparse_tables: dict[str, tuple[str, list[str], int, int]], explanations: list[str]) -> onnx.NodeProto:
    """``Gather(E, ids)`` reading the stored copy of an output projection tied to the
    embedding table ``E`` (``W = E^T``), so the artifact stores the table once instead of
    twice (SmolLM2-135M: 113 MB saved). ``backend.gather`` builds the node; a Gather in
    ``sparse_tables`` (its output -> the format, lifted arrays and [K, N] of the tied
    projection's sparse kernel) gets ``backend.sparse_gather``.
    """
    if node.output and node.output[0] in sparse_tables:
        format, names, k, n = sparse_tables[node.output[0]]
        explanations.append(f"{backend.name}: {node_label(node)} reads the embedding rows from the {format} arrays of the tied "
                            f"output projection; the table is stored once, sparse.")
        return backend.sparse_gather(node, format, names, k, n)
    if backend.gather is None or not _row_gather(node):
        return node
    table = graph.constant(node.input[0])
    if table is None or table.ndim != 2 or table.dtype != np.float32:
        return node
    for weight, stored in stored_weights:
        if weight.shape == table.shape[::-1] and np.array_equal(weight.T, table):
            explanations.append(f"{backend.name}: {node_label(node)} reads the embedding rows from the stored tied output "
                                f"projection ({stored}); the table is stored once.")
            return backend.gather(node, stored, table)
    return node


def _live_nodes(nodes: list[onnx.NodeProto], graph_outputs: set[str]) -> list[onnx.NodeProto]:
    """``nodes`` without those whose results nothing reads (a Transpose of a weight that
    fed a matmul now reading its stored copy), so their weights leave the artifact."""
    needed = set(graph_outputs)
    live = []
    for node in reversed(nodes):
        if any(output in needed for output in node.output):
            live.append(node)
            needed.update(name for name in node.input if name)
    return live[::-1]


def _zero_threshold(model: onnx.ModelProto) -> str:
    """A [1] zero threshold: a relu gate keeps exactly the nonzero inputs."""
    name = "sparsecc_zero_threshold"
    if not any(init.name == name for init in model.graph.initializer):
        model.graph.initializer.append(numpy_helper.from_array(np.zeros(1, np.float32), name))
    return name


def legalize(model: onnx.ModelProto, backend: Backend) -> tuple[onnx.ModelProto, list[tuple[str, np.ndarray, str]], list[str]]:
    """Rewrites linear layers to ``backend``'s kernels and lifts weights to graph inputs.

    Returns:
        The rewritten model, the lifted weights as (input name, array, source name) in
        graph-input order, and one explanation per linear layer.
    """
    explanations: list[str] = []
    if backend.decode_attention:
        explanations.extend(f"{backend.name}: {line}" for line in fuse_decode_attention(model, backend.domain))
    graph = Graph(model.graph)
    weights: list[tuple[str, np.ndarray, str]] = []
    stored_names: dict[tuple[str, bool], str] = {}
    new_nodes: list[onnx.NodeProto] = []

    taken = set(graph.initializers) | set(graph.producers) | set(graph.graph_inputs)

    def lift(array: np.ndarray, source: str) -> str:
        name = f"weight{len(weights)}"
        while name in taken:
            name = "_" + name
        taken.add(name)
        weights.append((name, np.ascontiguousarray(array), source))
        model.graph.input.append(helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(array.dtype), list(array.shape)))
        return name

    stored_weights: list[tuple[np.ndarray, str]] = []
    tied = _tied_sparse_weights(model, graph, backend)
    sparse_tables: dict[str, tuple[str, list[str], int, int]] = {}

    def dense_matmul(x: str, weight: np.ndarray, key: tuple, source: str, output: str, name: str) -> list[onnx.NodeProto]:
        if key not in stored_names:
            stored_names[key] = lift(backend.store_dense(weight), source)
            stored_weights.append((weight, stored_names[key]))
        k, n = weight.shape
        return backend.dense(x, stored_names[key], int(k), int(n), output, name)

    def quantized_matmul(node: onnx.NodeProto, found, key: str, x: str, output: str) -> list[onnx.NodeProto]:
        """The target's quantized kernel for ``y = x @ W`` (``found``: ``quantized_weight``'s
        answer), or the dense kernel on the dequantized weight where it has none."""
        label = node_label(node)
        if isinstance(found, Dequantized):
            k, n = found.weight.shape
            explanations.append(f"{backend.name}: {label} [{k}x{n}] -> dense kernel on the dequantized weight: {found.reason}.")
            return dense_matmul(x, found.weight, (key, False), key, output, node.name or output)
        quantized, exact = found
        k, n = quantized.shape
        if backend.quant_dense is None:
            weight = quantized.dequantize()
            explanations.append(f"{backend.name}: {label} [{k}x{n}] {quantized.dtype} -> dense kernel on the dequantized "
                                f"weight (the {backend.name} target has no quantized kernels).")
            return dense_matmul(x, weight, (key, False), key, output, node.name or output)
        note = "" if exact else " (its scales rounded to float16, as the kernel stores them)"
        explanations.append(f"{backend.name}: {label} [{k}x{n}] -> {quantized.dtype} kernel, groups of {quantized.group}"
                            f"{note}.")
        return backend.quant_dense(x, stored_quantized(key, quantized), quantized, output, node.name or output)

    def stored_quantized(key: str, quantized) -> list[str]:
        """The lifted names of a quantized weight's arrays, stored once per weight."""
        if key not in stored_names:
            stored_names[key] = [lift(array, f"{key}:{part}") for array, part in
                                 zip(backend.store_quantized(quantized), ("codes", "scales", "mins"))]
        return stored_names[key]

    def quantized_table(node: onnx.NodeProto) -> onnx.NodeProto | None:
        """An embedding lookup in the quantized table of a tied output projection
        (``Gather(Transpose(W'), ids)``, ``passes.quantize_weights``) on the stored
        projection, or None for any other node."""
        if not _row_gather(node) or backend.quant_gather is None:
            return None
        transpose = graph.producers.get(node.input[0])
        if transpose is None or transpose.op_type != "Transpose" or list(attribute(transpose, "perm", [])) != [1, 0]:
            return None
        found = quantized_weight(transpose.input[0], graph)
        if not isinstance(found, tuple):
            return None
        quantized = found[0]
        explanations.append(f"{backend.name}: {node_label(node)} reads the embedding rows from the stored {quantized.dtype} "
                            f"output projection ({transpose.input[0]}); the table is stored once.")
        return backend.quant_gather(node, stored_quantized(transpose.input[0], quantized), quantized)

    for node in model.graph.node:
        gather = quantized_table(node)
        if gather is not None:
            new_nodes.append(gather)
            continue
        if node.op_type == "MatMulNBits" and node.domain == "com.microsoft":
            found = matmul_nbits_weight(node, graph)
            if isinstance(found, str):
                raise SparseccError(f"{node_label(node)} (com.microsoft.MatMulNBits) cannot be compiled: {found}.")
            bias = node.input[5] if len(node.input) > 5 and node.input[5] else None
            product = node.output[0] + "_product" if bias else node.output[0]
            new_nodes.extend(quantized_matmul(node, found, node.input[1], node.input[0], product))
            if bias:
                new_nodes.append(helper.make_node("Add", [product, bias], [node.output[0]], name=node_label(node) + "_bias"))
            continue
        if node.op_type == "MatMul" and node.domain in ("", "ai.onnx") and len(node.input) == 2:
            found = quantized_weight(node.input[1], graph)
            if isinstance(found, str):
                raise SparseccError(f"{node_label(node)}: its quantized weight cannot be compiled: {found}.")
            if found is not None:
                new_nodes.extend(quantized_matmul(node, found, node.input[1], node.input[0], node.output[0]))
                continue
        if node.output and node.output[0] in tied:
            # The table's only copy: the sparse kernel serves prompts too (where the dense
            # kernel on a decoded copy would be faster but store the table dense).
            arrays = [graph.constant(name) for name in node.input[1:]]
            readable = tuple(f for f in backend.sparse_formats if f in backend.sparse_gather_formats)
            kernel, format, names = _sparse_kernel(node, arrays, node.overload, readable, backend, lift, explanations,
                                                   " at every row count (tied to the embedding table, which reads its rows)")
            new_nodes.append(kernel)
            k, n = (int(d) for d in attribute(node, "shape"))
            sparse_tables.update(dict.fromkeys(tied[node.output[0]], (format, names, k, n)))
            continue
        if node.domain == sparse_ops.DOMAIN:
            new_nodes.extend(_legalize_sparse_op(node, model, graph, backend, dense_matmul, lift, explanations))
            continue
        if node.op_type not in ("MatMul", "Gemm") or node.domain not in ("", "ai.onnx"):
            new_nodes.append(node)
            continue
        found = _linear_weight(node, graph)
        if isinstance(found, str):
            explanations.append(f"{backend.name}: {node_label(node)} stays a TVM matmul: {found}.")
            new_nodes.append(node)
            continue
        weight, source = found
        k, n = weight.shape
        # Matmuls that read the same tensor the same way share one stored copy; a
        # tied output projection reads the embedding table through a Transpose, which
        # is a different tensor name and so gets its own copy.
        key = (node.input[1], node.op_type == "Gemm" and bool(attribute(node, "transB", 0)))
        output = node.output[0]
        has_bias = node.op_type == "Gemm" and len(node.input) > 2 and node.input[2]
        matmul_out = output + "_panel" if has_bias else output
        new_nodes.extend(dense_matmul(node.input[0], weight, key, source, matmul_out, node.name or output))
        if has_bias:
            new_nodes.append(helper.make_node("Add", [matmul_out, node.input[2]], [output], name=(node.name or output) + "_bias"))
        explanations.append(f"{backend.name}: {node_label(node)} [{k}x{n}] -> dense kernel.")

    new_nodes = _live_nodes([_gather_from_stored(node, graph, backend, stored_weights, sparse_tables, explanations)
                             for node in new_nodes], {output.name for output in model.graph.output})
    del model.graph.node[:]
    model.graph.node.extend(new_nodes)
    remove_unused_initializers(model.graph)

    # Large constants that are not matmul weights (embedding tables, position tables)
    # are lifted too, so the library stays small.
    lifted: dict[str, str] = {}
    keep = []
    for init in model.graph.initializer:
        is_float = init.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)
        size = int(np.prod(init.dims)) * (4 if init.data_type == onnx.TensorProto.FLOAT else 2)
        if is_float and size >= LIFT_MIN_BYTES:
            lifted[init.name] = lift(numpy_helper.to_array(init), init.name)
            explanations.append(f"{backend.name}: constant {init.name} {list(init.dims)} ({size} bytes) -> graph input "
                                f"{lifted[init.name]}, stored in the weights file (constants of at least "
                                f"{LIFT_MIN_BYTES} bytes stay out of the library).")
        else:
            keep.append(init)
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    for node in model.graph.node:
        for index, name in enumerate(node.input):
            if name in lifted:
                node.input[index] = lifted[name]
    # The reference functions of the ai.sparsecc ops are no longer used.
    keep_functions = [f for f in model.functions if f.domain != sparse_ops.DOMAIN]
    del model.functions[:]
    model.functions.extend(keep_functions)
    if not any(opset.domain == backend.domain for opset in model.opset_import):
        model.opset_import.append(helper.make_opsetid(backend.domain, 1))
    return model, weights, explanations
