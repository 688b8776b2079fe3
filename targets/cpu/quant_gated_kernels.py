"""Activation-sparse matmul kernels on quantized weights (int8, int4) for the CPU, in TIR.

The kernels compute ``y[M, N] = gate(x)[M, K] @ W[K, N]`` with

    gate(x)[m, k] = x[m, k] if |x[m, k]| > t[k] else 0

(``t`` float32 ``[K]``, one threshold per input, or ``[1]``, the operand of the fp32 gated
kernel ``targets.cpu.sparse_kernels.gated_matmul_func``) and ``W`` quantized exactly as
``targets.cpu.quant_kernels`` quantizes it: per column and group of ``group`` (32)
consecutive inputs, ``g(k) = k // group``, a float16 scale ``d`` (and minimum ``m``)::

    int8 (Q8_0):           W[k, j] = d[g(k), j] * q[k, j]                 q in -127..127
    int4 (Q4_1):           W[k, j] = d[g(k), j] * q[k, j] + m[g(k), j]    q in 0..15
    int4 symmetric (Q4_0): W[k, j] = d[g(k), j] * (q[k, j] - 8)

An input ``k`` is *inactive* when ``gate(x)[:, k]`` is zero in every row of ``x``; the
kernel then reads none of its codes. Activations stay float32: each active row of codes
is widened to float32 and scaled (and offset) per column, and multiplied by the gated
``x`` with float32 FMAs, so the only error is float32's summation order.

Layout (``pack_gated``, ``quantize_gated_int8``, ``quantize_gated_int4``): row-major by
input, each input's codes one contiguous run over all ``N`` columns, as the fp32 gated
kernel's plain ``[K, N]`` weight::

    int8  codes[k, j]          = q[k, j]                                int8  [K, Np]
    int4  codes[k, 16 c + i]   = q[k, 32 c + i] | q[k, 32 c + 16 + i] << 4  uint8 [K, Np / 2]
    scales[g, j] = d[g, j]     (and mins likewise)                      float16 [G, Np]

with ``Np`` = ``N`` rounded up to 16 (int8) or 32 (int4) columns, zero-padded, and ``G =
ceil(K / group)``. Sixteen int4 bytes widen to two vectors of sixteen columns with one
mask and one shift. The scales (and minimums) are the quantized kernels' bytes too, read
here whenever a group has an active input: 2 (or 4) / 32 bytes per weight that are not
skipped, which bounds the speedup over the dense kernel of the same dtype at an inactive
fraction ``f`` to ``(c + p) / ((1 - f) c + p)``, ``c`` and ``p`` the code and parameter
bytes per weight (at 50 %: 1.89x for int8, 1.67x for int4, 1.80x for symmetric int4).

Loops: the split-K skeleton of the fp32 gated kernel (``targets.cpu.skeletons.split_k``):
the active inputs are listed, ``k_parts`` parallel tasks take equal slices of the list
and add ``gate(x)[:, k] * W[k, :]`` into their own partial ``y``, ``ROWS_PER_STEP`` (4)
rows of codes at a time, and the partials are summed. Four consecutive active inputs are
mostly in one group, so a step widens the four rows' codes, sums ``sum_j g_j q_j`` and
scales once: ``partial += d * sum_j g_j q_j + m * sum_j g_j`` (with ``m`` zero for int8
and ``-8 d`` for symmetric int4); a step across groups scales each row by its own group.
Each step's rows are prefetched ``PREFETCH_BYTES`` ahead, the last lines of a step
prefetch the start of the next step's rows wherever the skipped inputs put them, and the
scales (and minimums) of the step's group are prefetched alongside (once 0.09 against
0.13 ms without, at 90 % inactive on 2048x5632 int8; a second try under load was within
the noise). An input is skipped only when inactive in all ``M``
rows; the whole ``[M, N]`` tile of partial sums stays in L1 at decode.

Why whole rows. A first version cut the columns into blocks of 64 (int8) or 128 (int4),
each block's rows contiguous (one 64-byte line per input and block), parallel over
blocks: its skipped lines sat between read ones in one ascending stream, which the
hardware prefetchers fetch whole, so at 50 % inactive it was no faster than at 0 %
(0.56 against 0.56 ms, dense 0.45, on 2048x5632 int8). Rows of 128 bytes per block at a
stride of ``N`` reached 1.1-1.3x the dense kernel; whole rows (a skipped row of ``N``
bytes is skipped in DRAM too) the table below.

Measured (``python benchmarks/quant_gated_gemv.py``, two runs; AMD EPYC Zen 5, LLVM
``znver5``, 2 cores, L2 1 MB per core, L3 32 MB, ``TVM_NUM_THREADS=2``, M = 1, weights
from DRAM, medians of 7 and 9 rounds in one process, the benchmark at nice -10). Load
average 1.0-1.9, and in both runs another process took one full core throughout
(``others`` 1.01), so the kernels ran on about 1.x cores: compute-bound kernels look
worse than on an idle machine, and only the ratios within one shape mean anything.
"x dense" is the speedup over the dense kernel of the same dtype (``quant_kernels``,
its default path: int8 ``fma``, int4 ``vnni``), "ideal" that kernel's bytes over the
bytes the gated call needs (active codes and every scale), "x fp32g" the speedup over
the fp32 gated kernel at the same fraction::

    2048x5632 (dense: fp32 1.54 / 1.69 ms, int8 0.465 / 0.446, int4 0.308 / 0.317,
               int4 sym 0.283 / 0.283)
    kernel       inactive  ms (run 1 / 2)   x dense      ideal  GB/s  x fp32g
    int8 gated      0 %    0.594 / 0.593    0.78 / 0.75  1.00   20.7  2.8-3.5
                   25 %    0.507 / 0.500    0.92 / 0.89  1.31   18.6  2.6-3.2
                   40 %    0.423 / 0.435    1.10 / 1.02  1.60   17.8  2.9-3.1
                   50 %    0.355 / 0.385    1.31 / 1.16  1.89   17.5  2.8-2.9
                   70 %    0.253 / 0.269    1.84 / 1.66  2.93   16.0  2.7
    int4 gated      0 %    0.514 / 0.517    0.60 / 0.61  1.00   14.0  3.3-4.0
                   50 %    0.339 / 0.334    0.91 / 0.95  1.67   12.8  2.9-3.4
                   70 %    0.249 / 0.257    1.24 / 1.24  2.27   12.6  2.8
    int4 sym gated  0 %    0.412 / 0.413    0.69 / 0.68  1.00   15.7  4.1-5.0
                   50 %    0.282 / 0.281    1.00 / 1.01  1.80   12.8  3.5-4.0
                   70 %    0.209 / 0.205    1.35 / 1.38  2.65   11.9  3.3-3.5
    fp32 gated     50 %    0.996 / 1.124    1.54 / 1.51  2.00   21.9

    576x1536 / 1536x576, run 1 (dense int8 0.037 / 0.037 ms, int4 0.028 / 0.029)
    int8 gated     50 %    0.032 / 0.042    1.17 / 0.88  1.89
                   70 %    0.026 / 0.031    1.45 / 1.19  2.93
    int4 gated     50 %    0.030 / 0.042    0.93 / 0.69  1.67
    int4 sym gated 50 %    0.028 / 0.040    0.88 / 0.66  1.80

(``benchmarks/quant_gated_gemv.py`` prints every fraction of every shape.)

What the figures say, honestly:

- The goal (>= 1.6x the dense kernel of the same dtype at 50 % inactive on 2048x5632) is
  not met: int8 1.16-1.31x (it reaches 1.66-1.84x at 70 %), int4 0.91-0.95x and symmetric
  int4 1.0x (1.24x / 1.35x at 70 %). Against the fp32 gated kernel at the same
  activation sparsity the gated int8 kernel is 2.6-3.5x faster and int4 2.8-5x.
- They are bound by their arithmetic, not by bytes: the rate of weights each multiplies
  is about the same at every fraction (16-17 G weights/s for both dtypes in these runs,
  so the int4 kernels' GB/s is half the int8 ones'), while the dense kernels multiply
  faster (int4 on ``vnni``: 64 multiply-adds per instruction; int8 ``fma`` on 64-lane
  lines). Each active weight costs a widening, a conversion to float32 and an FMA per
  row (the scale, minimum and the partial sum's load and store shared by four rows).
  From L2 one core ran them at 28-31 G weights/s, so on two idle cores the kernels would
  sit closer to their bytes; that was not measurable here.
- What would close the gap is the integer path of ``quant_kernels`` (``x`` rounded to
  int8 per group, ``vpdpbusd``), which needs four inputs interleaved per 32-bit lane: a
  skipped input would then have to be skipped four at a time, or the active rows'
  bytes interleaved on the fly. Not done here.
- The small shapes (SmolLM2's 576x1536 and 1536x576) are slower still: 1536x576's rows
  are 576 bytes of int8 (288 of int4), too short for the per-row prefetch to run ahead,
  and the call's fixed costs (the serial list of active inputs, two parallel launches,
  the partial sums) are a larger share of a 30-40 us call.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from targets.cpu import quant_kernels as qk
from targets.cpu.simd import LANES, PREFETCH_BYTES, prefetch
from targets.cpu.skeletons import GATED_K_PARTS, SPARSE_ROW_TILE, gate_tile_macro, row_tiles, split_k
from targets.kernel_args import check_gate, check_sizes, func_attrs

GROUP = qk.GROUP
#: Bytes of one cache line, the unit of the prefetches.
LINE_BYTES = 64
#: Columns one padded row of codes comes in: 16 (one int8 vector) or 32 (16 int4 bytes).
ROW_ALIGN = {8: LANES, 4: 2 * LANES}
#: Active rows of codes walked at once: as many streams in flight, and one scaling and
#: one read-modify-write of the partial sums for all of them (2 rows, as the fp32 gated
#: kernel walks them, measured no faster; 8 no faster than 4).
ROWS_PER_STEP = 4

_SYMBOL = re.compile(
    r"gated_int(?P<bits>8|4)(?P<sym>s?)_matmul_m(?P<m>\d+)_k(?P<k>\d+)_n(?P<n>\d+)_g(?P<group>\d+)"
    r"_(?P<gate>channel|scalar)"
)


@dataclass(frozen=True)
class GatedQuantizedWeight:
    """A ``[k, n]`` quantized weight in the gated kernels' layout (module docstring).

    ``codes`` int8 ``[k, Np]`` (int8) or uint8 ``[k, Np / 2]`` (int4); ``scales`` (and
    ``mins``, asymmetric int4 only) float16 ``[ceil(k / group), Np]``.
    """

    bits: int
    symmetric: bool
    k: int
    n: int
    group: int
    codes: np.ndarray
    scales: np.ndarray
    mins: np.ndarray | None = None

    def arrays(self) -> list[np.ndarray]:
        """The weight's arrays in the order the kernel takes them (after ``x`` and ``t``)."""
        return [self.codes, self.scales] + ([] if self.mins is None else [self.mins])

    @property
    def nbytes(self) -> int:
        """Bytes of every code, scale and minimum (what a call with every input active reads)."""
        return int(sum(a.nbytes for a in self.arrays()))


def _padded_columns(per_column: np.ndarray, align: int) -> np.ndarray:
    """``[R, N]`` zero-padded to ``[R, Np]``, ``Np`` the next multiple of ``align``."""
    rows, n = per_column.shape
    padded = np.zeros((rows, -(-n // align) * align), per_column.dtype)
    padded[:, :n] = per_column
    return padded


def pack_gated(weight: qk.QuantizedWeight) -> GatedQuantizedWeight:
    """The same codes, scales and minimums as ``weight`` (from ``quant_kernels.quantize_*``),
    in the gated kernels' layout, so the gated and the dense kernels compute with the
    same quantized weight."""
    codes, scales, mins = qk.unpack(weight)
    align = ROW_ALIGN[weight.bits]
    if weight.bits == 8:
        packed = _padded_columns(codes, align)
    else:
        nibbles = _padded_columns((codes.astype(np.int16) + (8 if weight.symmetric else 0)).astype(np.uint8), align)
        pairs = nibbles.reshape(weight.k, -1, 2, LANES)  # [K, Np / 32, low / high, 16]
        packed = (pairs[:, :, 0] | (pairs[:, :, 1] << 4)).reshape(weight.k, -1)
    as_fp16 = lambda per_group: _padded_columns(per_group.astype(np.float16), align)  # noqa: E731 (exact)
    return GatedQuantizedWeight(
        weight.bits, weight.symmetric, weight.k, weight.n, weight.group, np.ascontiguousarray(packed),
        as_fp16(scales), None if mins is None else as_fp16(mins),
    )


def quantize_gated_int8(weight: np.ndarray, group: int = GROUP) -> GatedQuantizedWeight:
    """``quant_kernels.quantize_int8`` (Q8_0-like rounding) in the gated layout.

    Raises:
        ValueError: as ``quant_kernels.quantize_int8``.
    """
    return pack_gated(qk.quantize_int8(weight, group))


def quantize_gated_int4(weight: np.ndarray, group: int = GROUP, symmetric: bool = False) -> GatedQuantizedWeight:
    """``quant_kernels.quantize_int4`` (Q4_1-like, or Q4_0-like when ``symmetric``) in the
    gated layout.

    Raises:
        ValueError: as ``quant_kernels.quantize_int4``.
    """
    return pack_gated(qk.quantize_int4(weight, group, symmetric))


def unpack_gated(weight: GatedQuantizedWeight) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """``(codes [K, N], scales [G, N], mins [G, N] or None)`` as ``quant_kernels.unpack``
    gives them: the inputs of ONNX ``DequantizeLinear(block_size=group, axis=0)``."""
    if weight.bits == 8:
        codes = weight.codes
    else:
        pairs = weight.codes.reshape(weight.k, -1, 1, LANES)
        codes = np.concatenate([pairs & 15, pairs >> 4], axis=2).reshape(weight.k, -1)
        if weight.symmetric:
            codes = (codes.astype(np.int8) - 8).astype(np.int8)
    columns = slice(0, weight.n)
    mins = None if weight.mins is None else weight.mins[:, columns].astype(np.float32)
    return np.ascontiguousarray(codes[:, columns]), weight.scales[:, columns].astype(np.float32), mins


# --- Kernel symbols ----------------------------------------------------------------------


def kernel_symbol(bits: int, symmetric: bool, m: int, k: int, n: int, group: int, per_channel: bool) -> str:
    """The global symbol of a gated quantized kernel, which ``parse_kernel_symbol`` reads back:
    ``gated_int{8|4|4s}_matmul_m{m}_k{k}_n{n}_g{group}_{channel|scalar}``."""
    kind = f"{bits}{'s' if bits == 4 and symmetric else ''}"
    return f"gated_int{kind}_matmul_m{m}_k{k}_n{n}_g{group}_{'channel' if per_channel else 'scalar'}"


def parse_kernel_symbol(name: str) -> dict | None:
    """The facts ``kernel_symbol`` spelled into ``name`` (``bits``, ``symmetric``, ``m``, ``k``,
    ``n``, ``group``, ``per_channel``), or None for any other name."""
    match = _SYMBOL.fullmatch(name)
    if match is None:
        return None
    facts = {key: int(match[key]) for key in ("bits", "m", "k", "n", "group")}
    return {**facts, "symmetric": facts["bits"] == 8 or match["sym"] == "s", "per_channel": match["gate"] == "channel"}


# --- Kernels -----------------------------------------------------------------------------


def gated_int8_matmul_func(
    m: int, k: int, n: int, group: int = GROUP, per_channel: bool = True, k_parts: int = GATED_K_PARTS
):
    """A TIR PrimFunc computing ``y = gate(x) @ W`` for ``W = quantize_gated_int8(...)``.

    Parameters, in order: ``x`` float32 [m, k], ``threshold`` float32 [k] (``per_channel``)
    or [1], ``codes`` int8 and ``scales`` float16 of the ``GatedQuantizedWeight``, ``y``
    float32 [m, n] (every element written). An input is skipped, with its row of codes,
    when ``gate(x)`` is zero for it in every row of ``x``. Global symbol
    ``kernel_symbol(8, True, m, k, n, group, per_channel)``.

    Args:
        m: rows of ``x``; any positive value (decode is 1 to 8).
        k: reduction size; need not be a multiple of ``group``.
        n: output size; need not be a multiple of 16.
        group: inputs per quantization group, as the weight was quantized.
        per_channel: one threshold per input (``[k]``) rather than one for all (``[1]``).
        k_parts: parallel tasks over the active inputs (at least the number of cores).

    Returns:
        A ``tvm.tirx.PrimFunc``.

    Raises:
        ValueError: for a non-positive size or ``k_parts``, a bad ``group``, or a
            non-bool ``per_channel``.
    """
    return _gated_quant_func(m, k, n, 8, True, group, per_channel, k_parts)


def gated_int4_matmul_func(
    m: int, k: int, n: int, group: int = GROUP, symmetric: bool = False, per_channel: bool = True,
    k_parts: int = GATED_K_PARTS,
):
    """A TIR PrimFunc computing ``y = gate(x) @ W`` for ``W = quantize_gated_int4(...,
    symmetric)``.

    Parameters, in order: ``x`` float32 [m, k], ``threshold`` float32 [k] or [1], ``codes``
    uint8, ``scales`` float16 and (asymmetric only) ``mins`` float16 of the
    ``GatedQuantizedWeight``, ``y`` float32 [m, n]. Global symbol ``kernel_symbol(4,
    symmetric, m, k, n, group, per_channel)``. Arguments as ``gated_int8_matmul_func``'s.
    """
    return _gated_quant_func(m, k, n, 4, symmetric, group, per_channel, k_parts)


def _gated_quant_func(m, k, n, bits, symmetric, group, per_channel, k_parts):
    from tvm.script import tirx as T

    check_sizes(m=m, k=k, n=n)
    qk._check_group(group)
    check_gate(per_channel, k_parts)
    align = ROW_ALIGN[bits]
    padded_n = -(-n // align) * align
    groups = -(-k // group)
    has_mins = bits == 4 and not symmetric
    row_bytes = padded_n * bits // 8
    # A byte vector (16 codes' bytes) holds 16 columns of int8 or 32 of int4; the vectors
    # of y's partial sums stop at ceil(n / 16), so the last int4 byte vector's high
    # nibbles are dropped when they are all padding.
    byte_vectors = row_bytes // LANES
    per_line = LINE_BYTES // LANES
    full_lines, tail_vectors = divmod(byte_vectors, per_line)
    last_high = bits == 4 and -(-n // LANES) % 2 == 0
    if bits == 4 and not last_high and tail_vectors == 0:
        # The last byte vector, whose high half is dropped, is walked as a tail.
        full_lines, tail_vectors = full_lines - 1, per_line
    ahead = min(PREFETCH_BYTES // LINE_BYTES, full_lines)
    in_row = full_lines - ahead
    line_columns = LINE_BYTES * 8 // bits  # columns of one line of codes
    param_lines = line_columns * 2 // LINE_BYTES  # lines of float16 parameters under it
    gate_tile = gate_tile_macro(per_channel)
    symbol = kernel_symbol(bits, symmetric, m, k, n, group, per_channel)

    def codes_at(weights, row, byte, half):
        # 16 codes of row `row` as float32: int8 bytes, or the low (half 0) or high
        # (half 1) nibbles of int4 bytes.
        line = weights[0][row, T.Ramp(byte, 1, LANES)]
        if bits == 8:
            return T.Cast("float32x16", line)
        if half == 0:
            return T.Cast("float32x16", T.bitwise_and(line, T.Broadcast(T.uint8(15), LANES)))
        return T.Cast("float32x16", T.shift_right(line, T.Broadcast(T.uint8(4), LANES)))

    def params_at(params, row, column):
        return T.Cast("float32x16", params[row // group, T.Ramp(column, 1, LANES)])

    def weights_at(weights, row, byte, column, half):
        # The 16 float32 weights: d q (int8), d q + m (int4) or d (q - 8) (symmetric).
        codes, scale = codes_at(weights, row, byte, half), params_at(weights[1], row, column)
        if bits == 8:
            return codes * scale
        if has_mins:
            return codes * scale + params_at(weights[2], row, column)
        return (codes - T.Broadcast(T.float32(8), LANES)) * scale

    def stepped(partial_sum, weights, gated, step_sum, rows_at, byte, column, half, r, tile_rows, same):
        # partial + sum_j gate(x)[r, k_j] W[k_j, :] on 16 columns, over the step's rows k_j.
        # For rows of one group (most steps: consecutive active inputs), the scale and
        # minimum are applied once to all: d sum_j g_j q_j + m sum_j g_j, with step_sum[r]
        # = sum_j g_j (times 8 for symmetric int4, whose zero point it removes).
        g = [T.Broadcast(gated[j * tile_rows + r], LANES) for j in range(ROWS_PER_STEP)]
        if not same:
            total = partial_sum
            for j in range(ROWS_PER_STEP):
                total = total + g[j] * weights_at(weights, rows_at[j], byte, column, half)
            return total
        codes = g[0] * codes_at(weights, rows_at[0], byte, half)
        for j in range(1, ROWS_PER_STEP):
            codes = codes + g[j] * codes_at(weights, rows_at[j], byte, half)
        scale = params_at(weights[1], rows_at[0], column)
        if bits == 8:
            return partial_sum + scale * codes
        if has_mins:
            return partial_sum + scale * codes + params_at(weights[2], rows_at[0], column) * T.Broadcast(step_sum[r], LANES)
        return partial_sum + scale * (codes - T.Broadcast(step_sum[r], LANES))

    @T.macro
    def add_columns(partial, weights, gated, step_sum, p, rows_at, byte, column, half, m0, tile_rows, same):
        for r in T.unroll(tile_rows):
            partial[p, m0 + r, T.Ramp(column, 1, LANES)] = stepped(
                partial[p, m0 + r, T.Ramp(column, 1, LANES)], weights, gated, step_sum, rows_at, byte, column, half, r,
                tile_rows, same,
            )

    @T.macro
    def add_byte_vector(partial, weights, gated, step_sum, p, rows_at, v, m0, tile_rows, high, same):
        # Byte vector v of the step's rows: columns 16 v.. (int8), or 32 v.. and 32 v + 16..
        if bits == 8:
            add_columns(partial, weights, gated, step_sum, p, rows_at, v * LANES, v * LANES, 0, m0, tile_rows, same)
        else:
            add_columns(partial, weights, gated, step_sum, p, rows_at, v * LANES, 2 * v * LANES, 0, m0, tile_rows, same)
            if high:
                add_columns(partial, weights, gated, step_sum, p, rows_at, v * LANES, 2 * v * LANES + LANES, 1, m0,
                            tile_rows, same)

    @T.macro
    def add_line(partial, weights, gated, step_sum, p, rows_at, line, m0, tile_rows, same):
        for u in T.unroll(per_line):
            add_byte_vector(partial, weights, gated, step_sum, p, rows_at, line * per_line + u, m0, tile_rows, True,
                            same)

    @T.macro
    def prefetch_params(weights, row, line):
        # The lines of row's group's scales (and minimums) under code line `line`.
        for t in T.unroll(param_lines):
            T.evaluate(prefetch(T.address_of(weights[1][row // group, line * line_columns + t * (LINE_BYTES // 2)])))
            if has_mins:
                T.evaluate(prefetch(T.address_of(weights[2][row // group, line * line_columns + t * (LINE_BYTES // 2)])))

    @T.macro
    def add_rows(partial, weights, gated, step_sum, p, rows_at, m0, tile_rows, same):
        # ROWS_PER_STEP rows at once: as many streams in flight, and one read-modify-write
        # of the partial sum (and one scaling) for all of them. The last lines of the step
        # prefetch the start of the next step's rows.
        for line in range(in_row):
            for j in T.unroll(ROWS_PER_STEP):
                T.evaluate(prefetch(T.address_of(weights[0][rows_at[j], (line + ahead) * LINE_BYTES])))
            prefetch_params(weights, rows_at[ROWS_PER_STEP - 1], line + ahead)
            add_line(partial, weights, gated, step_sum, p, rows_at, line, m0, tile_rows, same)
        for line in range(in_row, full_lines):
            for j in T.unroll(ROWS_PER_STEP):
                T.evaluate(prefetch(T.address_of(weights[0][rows_at[ROWS_PER_STEP + j], (line - in_row) * LINE_BYTES])))
            prefetch_params(weights, rows_at[2 * ROWS_PER_STEP - 1], line - in_row)
            add_line(partial, weights, gated, step_sum, p, rows_at, line, m0, tile_rows, same)
        for u in T.unroll(tail_vectors):
            add_byte_vector(partial, weights, gated, step_sum, p, rows_at, full_lines * per_line + u, m0, tile_rows,
                            last_high or u < tail_vectors - 1, same)

    @T.macro
    def row_tile(x, threshold, weights, partial, p, rows_at, valid, m0, tile_rows):
        # gated[j * tile_rows + r] = gate(x)[m0 + r, k_j]; the rows of a short last step
        # (j >= valid) repeat its last row at a zero input.
        gated = T.alloc_buffer((ROWS_PER_STEP * tile_rows,), "float32")
        for j in range(ROWS_PER_STEP):
            gate_tile(gated, j * tile_rows, x, threshold, rows_at[j], m0, tile_rows)
            if j >= valid:
                for r in range(tile_rows):
                    gated[j * tile_rows + r] = T.float32(0)
        step_sum = T.alloc_buffer((tile_rows,), "float32")
        for r in range(tile_rows):
            step_sum[r] = T.float32(0)
            for j in range(ROWS_PER_STEP):
                step_sum[r] = step_sum[r] + gated[j * tile_rows + r]
            step_sum[r] = step_sum[r] * T.float32(1 if has_mins else 8)
        if rows_at[0] // group == rows_at[ROWS_PER_STEP - 1] // group:
            add_rows(partial, weights, gated, step_sum, p, rows_at, m0, tile_rows, True)
        else:
            add_rows(partial, weights, gated, step_sum, p, rows_at, m0, tile_rows, False)

    rows, full_tiles, tail_rows = row_tiles(m, SPARSE_ROW_TILE)

    @T.macro
    def walk(x, threshold, weights, active, partial, p, first, end):
        # The slice active[first:end], ROWS_PER_STEP rows at a time (pairs_of_rows of the
        # fp32 gated kernel, widened); rows_at holds this step's rows and the next's,
        # clamped to the slice, copied to the stack as there.
        for q in range((end - first + ROWS_PER_STEP - 1) // ROWS_PER_STEP):
            rows_at = T.alloc_buffer((2 * ROWS_PER_STEP,), "int32")
            for i in range(2 * ROWS_PER_STEP):
                rows_at[i] = active[T.min(first + ROWS_PER_STEP * q + i, end - 1)]
            for t in range(full_tiles):
                row_tile(x, threshold, weights, partial, p, rows_at, end - first - ROWS_PER_STEP * q, t * rows, rows)
            if tail_rows > 0:
                row_tile(x, threshold, weights, partial, p, rows_at, end - first - ROWS_PER_STEP * q,
                         full_tiles * rows, tail_rows)

    matmul = split_k(m, k, n, per_channel, k_parts, walk)
    threshold_size = k if per_channel else 1
    code_shape = (k, row_bytes)
    param_shape = (groups, padded_n)
    code_dtype = "int8" if bits == 8 else "uint8"

    if has_mins:

        @T.prim_func
        def gated_quant_matmul(
            x: T.Buffer((m, k), "float32"),
            threshold: T.Buffer((threshold_size,), "float32"),
            codes: T.Buffer(code_shape, code_dtype),
            scales: T.Buffer(param_shape, "float16"),
            mins: T.Buffer(param_shape, "float16"),
            y: T.Buffer((m, n), "float32"),
        ):
            T.func_attr(func_attrs(symbol))
            matmul(x, threshold, (codes, scales, mins), y)

    else:

        @T.prim_func
        def gated_quant_matmul(
            x: T.Buffer((m, k), "float32"),
            threshold: T.Buffer((threshold_size,), "float32"),
            codes: T.Buffer(code_shape, code_dtype),
            scales: T.Buffer(param_shape, "float16"),
            y: T.Buffer((m, n), "float32"),
        ):
            T.func_attr(func_attrs(symbol))
            matmul(x, threshold, (codes, scales), y)

    return gated_quant_matmul
