"""The sparse operator set, domain ``ai.sparsecc`` version 1, with reference semantics.

Every op is defined as an ONNX model-local function (one per overload), written in
standard ONNX ops, so onnxruntime runs any rewritten model and it can be checked against
the dense original. Compilers (our CPU target) replace the nodes with kernels and never
run these bodies.

| op | inputs | attributes | overloads |
|---|---|---|---|
| ``SparseMatMul`` | X, weight arrays of the format | ``shape`` [K, N], ``block`` [R, C] (bsr) | ``dense``, ``csr``, ``bsr``, ``bitmask`` |
| ``ActivationGate`` | X, threshold (scalar or [K]) | ``mode`` | ``threshold``, ``relu`` |
| ``GatedMatMul`` | X, threshold, weight arrays | ``shape``, ``block`` | ``threshold_<format>`` |

Weight arrays are those of ``passes.sparse_formats.encode``. The gate is
``Y = X * (|X| > t)`` with exact zeros; ``relu`` mode is ``max(X, 0)``, for inputs a ReLU
already made sparse. ``GatedMatMul`` is ``SparseMatMul(ActivationGate(X), W)``.
"""

from __future__ import annotations

import onnx
import onnx.parser
from onnx import helper

DOMAIN = "ai.sparsecc"
VERSION = 1
# Overloaded functions need IR version 10.
MIN_IR_VERSION = 10
_OPSET = 18

_HEADER = f'<domain: "{DOMAIN}", opset_import: ["" : {_OPSET}]>'

# Row index of every stored entry of a CSR-like (indptr, entries) pair, in standard ops:
# each row r >= 1 marks the position where it starts, and the running count of marks
# at position p is the row p belongs to. Empty rows mark the same position twice.
_ROW_IDS = """
    one = Constant <value_ints: ints = [1]> ()
    minus_one = Constant <value_ints: ints = [-1]> ()
    zero_axis = Constant <value: tensor = int64 {0}> ()
    entries = Shape ($ENTRIES)
    slots = Add (entries, one)
    marks0 = ConstantOfShape <value: tensor = int64[1] {0}> (slots)
    starts32 = Slice (indptr, one, minus_one)
    starts = Cast <to: int = 7> (starts32)
    starts_shape = Shape (starts)
    ones = ConstantOfShape <value: tensor = int64[1] {1}> (starts_shape)
    marks = ScatterElements <reduction: string = "add"> (marks0, starts, ones)
    counts = CumSum (marks, zero_axis)
    zero = Constant <value_ints: ints = [0]> ()
    rows = Slice (counts, zero, entries)
"""

_DENSE_BODY = "y = MatMul ($X, weight)"

_CSR_BODY = _ROW_IDS.replace("$ENTRIES", "values") + """
    cols = Cast <to: int = 7> (indices)
    cols2 = Unsqueeze (cols, one)
    rows2 = Unsqueeze (rows, one)
    coords = Concat <axis: int = 1> (cols2, rows2)
    kn = Constant <value_ints: ints = @shape> ()
    zeros = ConstantOfShape <value: tensor = float[1] {0}> (kn)
    weight = ScatterND (zeros, coords, values)
    y = MatMul ($X, weight)
"""

_BSR_BODY = _ROW_IDS.replace("$ENTRIES", "indices") + """
    bcols = Cast <to: int = 7> (indices)
    rows2 = Unsqueeze (rows, one)
    bcols2 = Unsqueeze (bcols, one)
    coords = Concat <axis: int = 1> (rows2, bcols2)
    kn = Constant <value_ints: ints = @shape> ()
    rc = Constant <value_ints: ints = @block> ()
    two = Constant <value_ints: ints = [2]> ()
    k = Slice (kn, zero, one)
    n = Slice (kn, one, two)
    r = Slice (rc, zero, one)
    c = Slice (rc, one, two)
    indptr_size = Shape (indptr)
    block_rows = Sub (indptr_size, one)
    k_plus_c = Add (k, c)
    k_round = Sub (k_plus_c, one)
    block_cols = Div (k_round, c)
    tiles_shape = Concat <axis: int = 0> (block_rows, block_cols, r, c)
    tiles_zero = ConstantOfShape <value: tensor = float[1] {0}> (tiles_shape)
    tiles = ScatterND (tiles_zero, coords, values)
    rows_first = Transpose <perm: ints = [0, 2, 1, 3]> (tiles)
    padded_rows = Mul (block_rows, r)
    padded_cols = Mul (block_cols, c)
    padded_shape = Concat <axis: int = 0> (padded_rows, padded_cols)
    padded = Reshape (rows_first, padded_shape)
    origin = Concat <axis: int = 0> (zero, zero)
    extent = Concat <axis: int = 0> (n, k)
    weight_t = Slice (padded, origin, extent)
    weight = Transpose <perm: ints = [1, 0]> (weight_t)
    y = MatMul ($X, weight)
"""

_BITMASK_BODY = """
    zero = Constant <value_ints: ints = [0]> ()
    one = Constant <value_ints: ints = [1]> ()
    two = Constant <value_ints: ints = [2]> ()
    kn = Constant <value_ints: ints = @shape> ()
    k = Slice (kn, zero, one)
    n = Slice (kn, one, two)
    shifts = Constant <value: tensor = uint8[8] {0, 1, 2, 3, 4, 5, 6, 7}> ()
    low_bit = Constant <value: tensor = uint8 {1}> ()
    bytes3 = Unsqueeze (bits, two)
    shifted = BitShift <direction: string = "RIGHT"> (bytes3, shifts)
    bit_values = BitwiseAnd (shifted, low_bit)
    minus_one = Constant <value_ints: ints = [-1]> ()
    flat_shape = Concat <axis: int = 0> (n, minus_one)
    flat = Reshape (bit_values, flat_shape)
    trimmed = Slice (flat, zero, k, one)
    mask = Cast <to: int = 9> (trimmed)
    nonzero = NonZero (mask)
    positions = Transpose <perm: ints = [1, 0]> (nonzero)
    nk = Concat <axis: int = 0> (n, k)
    zeros = ConstantOfShape <value: tensor = float[1] {0}> (nk)
    weight_t = ScatterND (zeros, positions, values)
    weight = Transpose <perm: ints = [1, 0]> (weight_t)
    y = MatMul ($X, weight)
"""

# (weight input names, attribute names, body) per format.
_FORMATS = {
    "dense": (["weight"], ["shape"], _DENSE_BODY),
    "csr": (["indptr", "indices", "values"], ["shape"], _CSR_BODY),
    "bsr": (["indptr", "indices", "values"], ["shape", "block"], _BSR_BODY),
    "bitmask": (["bits", "row_offsets", "values"], ["shape"], _BITMASK_BODY),
}

_GATE_BODIES = {
    "threshold": """
    magnitude = Abs (x)
    active = Greater (magnitude, threshold)
    zero_value = Constant <value: tensor = float {0}> ()
    gated = Where (active, x, zero_value)
""",
    "relu": "    gated = Relu (x)\n",
}

FORMATS = tuple(_FORMATS)
GATE_MODES = tuple(_GATE_BODIES)


def _function(op: str, overload: str, inputs: list[str], attributes: list[str], body: str) -> onnx.FunctionProto:
    attrs = f"<{', '.join(attributes)}>" if attributes else ""
    text = f"{_HEADER}\n{op} {attrs}({', '.join(inputs)}) => (y) {{\n{body}\n}}"
    function = onnx.parser.parse_function(text)
    function.overload = overload
    return function


def sparse_matmul_function(format: str) -> onnx.FunctionProto:
    names, attributes, body = _FORMATS[format]
    return _function("SparseMatMul", format, ["x", *names], attributes, body.replace("$X", "x"))


def activation_gate_function(mode: str) -> onnx.FunctionProto:
    inputs = ["x", "threshold"] if mode == "threshold" else ["x"]
    return _function("ActivationGate", mode, inputs, [], _GATE_BODIES[mode] + "    y = Identity (gated)\n")


def gated_matmul_function(mode: str, format: str) -> onnx.FunctionProto:
    names, attributes, body = _FORMATS[format]
    inputs = ["x", "threshold", *names] if mode == "threshold" else ["x", *names]
    return _function("GatedMatMul", f"{mode}_{format}", inputs, attributes,
                     _GATE_BODIES[mode] + body.replace("$X", "gated"))


def sparse_matmul_node(x: str, weights: list[str], output: str, format: str, shape: tuple[int, int],
                       block: tuple[int, int] | None = None, name: str = "") -> onnx.NodeProto:
    """A ``SparseMatMul`` node; ``weights`` are the names of the format's arrays."""
    attributes = {"shape": list(shape)}
    if format == "bsr":
        attributes["block"] = list(block)
    node = helper.make_node("SparseMatMul", [x, *weights], [output], name=name, domain=DOMAIN, **attributes)
    node.overload = format
    return node


def activation_gate_node(x: str, threshold: str | None, output: str, mode: str, name: str = "") -> onnx.NodeProto:
    inputs = [x, threshold] if mode == "threshold" else [x]
    node = helper.make_node("ActivationGate", inputs, [output], name=name, domain=DOMAIN)
    node.overload = mode
    return node


def gated_matmul_node(x: str, threshold: str | None, weights: list[str], output: str, mode: str, format: str,
                      shape: tuple[int, int], block: tuple[int, int] | None = None, name: str = "") -> onnx.NodeProto:
    attributes = {"shape": list(shape)}
    if format == "bsr":
        attributes["block"] = list(block)
    inputs = [x, threshold, *weights] if mode == "threshold" else [x, *weights]
    node = helper.make_node("GatedMatMul", inputs, [output], name=name, domain=DOMAIN, **attributes)
    node.overload = f"{mode}_{format}"
    return node


def weight_operands(node: onnx.NodeProto) -> tuple[str, str, list[str]]:
    """(gate mode or "", format, weight array names) of a SparseMatMul or GatedMatMul."""
    if node.op_type == "GatedMatMul":
        mode, _, format = node.overload.partition("_")
        return mode, format, list(node.input[2:] if mode == "threshold" else node.input[1:])
    return "", node.overload, list(node.input[1:])


def _function_for(node: onnx.NodeProto) -> onnx.FunctionProto:
    if node.op_type == "SparseMatMul":
        return sparse_matmul_function(node.overload)
    if node.op_type == "ActivationGate":
        return activation_gate_function(node.overload)
    if node.op_type == "GatedMatMul":
        mode, _, format = node.overload.partition("_")
        return gated_matmul_function(mode, format)
    raise ValueError(f"{node.op_type} is not an {DOMAIN} op")


def attach_reference_functions(model: onnx.ModelProto) -> onnx.ModelProto:
    """Adds the function of every ``ai.sparsecc`` op overload the graph uses (once each),
    the domain's opset import and the IR version overloads need; drops unused ones."""
    needed = {}
    for node in model.graph.node:
        if node.domain == DOMAIN:
            needed.setdefault((node.op_type, node.overload), _function_for(node))
    keep = [f for f in model.functions if f.domain != DOMAIN]
    del model.functions[:]
    model.functions.extend(keep + list(needed.values()))
    if needed and not any(opset.domain == DOMAIN for opset in model.opset_import):
        model.opset_import.append(helper.make_opsetid(DOMAIN, VERSION))
    if needed:
        model.ir_version = max(model.ir_version, MIN_IR_VERSION)
    return model
