"""Activation-sparse matmul kernels on quantized weights (int8, int4) for the CPU, in TIR.

The kernels compute ``y[M, N] = gate(x)[M, K] @ W[K, N]`` with

    gate(x)[m, k] = x[m, k] if |x[m, k]| > t[k] else 0

(``t`` float32 ``[K]``, one threshold per input, or ``[1]``, as the fp32 gated kernel
``targets.cpu.sparse_kernels.gated_matmul_func`` takes it) and ``W`` quantized exactly as
``targets.cpu.quant_kernels`` quantizes it: per column and group of ``group`` (32)
consecutive inputs ``g(k) = k // group``, a float16 scale ``d`` (and minimum ``m``)::

    int8 (Q8_0):           W[k, j] = d[g(k), j] * q[k, j]          q in -127..127
    int4 (Q4_1):           W[k, j] = d[g(k), j] * q[k, j] + m[g(k), j]    q in 0..15
    int4 symmetric (Q4_0): W[k, j] = d[g(k), j] * (q[k, j] - 8)

An input ``k`` is *inactive* when ``gate(x)[:, k]`` is zero in every row of ``x``; the
kernel then reads none of its codes. Per group and column it sums over the active inputs
``A_g`` only::

    y[r, j] = sum_g ( d[g, j] * sum_{k in A_g} gate(x)[r, k] q[k, j]  +  o[g, j] * s[r, g] )

with ``s[r, g] = sum_{k in A_g} gate(x)[r, k]`` and the offset ``o = m`` (int4), ``-8 d``
(symmetric int4) or 0 (int8): the minimums and zero points cost one multiply-add per group,
not one per weight. Activations stay float32 (no rounding of ``x``: the products are
float32 FMAs of the widened codes).

Layout (``pack_gated`` / ``quantize_gated_int8`` / ``quantize_gated_int4``). The columns are
cut into blocks of ``C`` (``block``; 64 for int8 and 128 for int4 by default, zero-padded
at the end), and within a block the codes are row-major by input, so that each input's
codes for the block are one contiguous run of ``C`` (int8) or ``C / 2`` (int4) bytes, one
64-byte cache line by default, which an inactive input skips::

    int8  codes[b, k, c] = q[k, C b + c]                           int8  [B, K, C]
    int4  codes[b, k, c] = q[k, C b + c] | q[k, C b + C/2 + c] << 4  uint8 [B, K, C / 2]
    scales[b, g, c] = d[g, C b + c]   (and mins likewise)          float16 [B, G, C]

(``B = ceil(N / C)``, ``G = ceil(K / group)``; ``K`` is not padded, since the kernel only
ever reads the rows of inputs it lists.) An int4 line's low nibbles are the block's first
``C / 2`` columns and its high nibbles the last ``C / 2``, so sixteen bytes widen to two
vectors of sixteen columns with one mask and one shift. The scales (and minimums) are read
for every group with an active input: their bytes, 2 (or 4) / 32 per weight, are not
skipped, which bounds the speedup at an inactive fraction ``f`` to ``(c + p) / ((1 - f)
c + p)`` with ``c`` the code bytes and ``p`` the parameter bytes per weight (at 50 %:
1.89x for int8, 1.67x for int4, 1.80x for symmetric int4).

Steps of one call:

  1. serially (branch-free): for each input, whether it is active, the list ``active``
     of active inputs with the gated ``x`` of each (compact, ``xa[r, i]``), where each
     group's entries start in that list, and ``s[r, g]``;
  2. in parallel over column blocks (one stream of codes and one of scales per task):
     per group with an active input and per tile of ``ROW_TILE`` rows of ``x``, the
     float32 sums ``sum_k gate(x) q`` of the tile's rows in registers, over the group's
     active inputs (each prefetched ``PREFETCH_ROWS`` active inputs ahead, so the
     prefetch never lands on a skipped row); then ``d * sum + o * s`` added into the
     block's totals. The group's codes come from DRAM for the first row tile and from L1
     for the others.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from targets.cpu import quant_kernels as qk
from targets.cpu.simd import prefetch

GROUP = qk.GROUP
#: Vector width in float32 lanes (AVX-512).
LANES = 16
#: Bytes of one cache line: each input's codes of one block, by default.
LINE_BYTES = 64
#: Columns per block by default: one line of codes per input (64 int8 or 128 int4 codes).
DEFAULT_BLOCK = {8: LINE_BYTES, 4: 2 * LINE_BYTES}
#: Vectors of per-group sums held in registers per tile (rows x block vectors), so a tile
#: of 2 rows at int8 (4 vectors a row) and 1 row at int4 (8 vectors); the widened codes
#: take as many again.
ACC_VECTORS = 8
#: Columns per chunk: the kernel walks an input's codes of a block in chunks whose
#: ``ACC_VECTORS`` vectors of sums stay in registers (128 bytes of int8, 64 of int4).
CHUNK_COLUMNS = ACC_VECTORS * 16
#: Active inputs ahead of the current one whose codes are prefetched.
PREFETCH_ROWS = 48

_SYMBOL = re.compile(
    r"gated_int(?P<bits>8|4)(?P<sym>s?)_matmul_m(?P<m>\d+)_k(?P<k>\d+)_n(?P<n>\d+)"
    r"_g(?P<group>\d+)_c(?P<block>\d+)_(?P<gate>channel|scalar)"
)


@dataclass(frozen=True)
class GatedQuantizedWeight:
    """A ``[k, n]`` quantized weight in the gated kernels' layout (module docstring).

    ``codes`` int8 ``[B, k, block]`` (int8) or uint8 ``[B, k, block / 2]`` (int4);
    ``scales`` (and ``mins``, asymmetric int4 only) float16 ``[B, ceil(k / group), block]``.
    """

    bits: int
    symmetric: bool
    k: int
    n: int
    group: int
    block: int
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


def _check_block(bits: int, block: int | None) -> int:
    """``block``, or the default for ``bits``: a multiple of 16 (int8) or 32 (int4) up to
    ``CHUNK_COLUMNS``, and a multiple of it beyond (the kernel walks a block in chunks)."""
    block = DEFAULT_BLOCK[bits] if block is None else block
    step = LANES if bits == 8 else 2 * LANES
    if not isinstance(block, (int, np.integer)) or block <= 0 or block % (step if block <= CHUNK_COLUMNS else CHUNK_COLUMNS):
        raise ValueError(f"block must be a positive multiple of {step} up to {CHUNK_COLUMNS} for int{bits}, "
                         f"and a multiple of {CHUNK_COLUMNS} beyond; got {block!r}")
    return int(block)


def _blocked(per_column: np.ndarray, block: int) -> np.ndarray:
    """``[R, N]`` -> ``[B, R, block]``, zero-padded past column ``N``."""
    rows, n = per_column.shape
    blocks = -(-n // block)
    padded = np.zeros((rows, blocks * block), per_column.dtype)
    padded[:, :n] = per_column
    return np.ascontiguousarray(padded.reshape(rows, blocks, block).transpose(1, 0, 2))


def _unblocked(per_block: np.ndarray, n: int) -> np.ndarray:
    """``[B, R, block]`` -> ``[R, n]``."""
    blocks, rows, block = per_block.shape
    return per_block.transpose(1, 0, 2).reshape(rows, blocks * block)[:, :n]


def pack_gated(weight: qk.QuantizedWeight, block: int | None = None) -> GatedQuantizedWeight:
    """The same codes, scales and minimums as ``weight`` (from ``quant_kernels.quantize_*``),
    in the gated kernels' layout.

    Args:
        weight: an int8 or int4 ``QuantizedWeight``.
        block: columns per block (module docstring); None for ``DEFAULT_BLOCK``.

    Raises:
        ValueError: for a ``block`` that is not a positive multiple of 16 (int8) or 32 (int4).
    """
    block = _check_block(weight.bits, block)
    codes, scales, mins = qk.unpack(weight)
    if weight.bits == 8:
        packed = _blocked(codes, block)
    else:
        nibbles = _blocked((codes.astype(np.int16) + (8 if weight.symmetric else 0)).astype(np.uint8), block)
        half = block // 2
        packed = nibbles[:, :, :half] | (nibbles[:, :, half:] << 4)
    # [B, K, bytes] -> [K, B, bytes]: each input's codes are one row over all N.
    packed = np.ascontiguousarray(packed.transpose(1, 0, 2))
    as_fp16 = lambda per_group: _blocked(per_group.astype(np.float16), block)  # noqa: E731 (exact: from float16)
    return GatedQuantizedWeight(
        weight.bits, weight.symmetric, weight.k, weight.n, weight.group, block, packed, as_fp16(scales),
        None if mins is None else as_fp16(mins),
    )


def quantize_gated_int8(weight: np.ndarray, group: int = GROUP, block: int | None = None) -> GatedQuantizedWeight:
    """``quant_kernels.quantize_int8`` (Q8_0-like rounding) in the gated layout."""
    return pack_gated(qk.quantize_int8(weight, group), block)


def quantize_gated_int4(
    weight: np.ndarray, group: int = GROUP, symmetric: bool = False, block: int | None = None
) -> GatedQuantizedWeight:
    """``quant_kernels.quantize_int4`` (Q4_1-like, or Q4_0-like when ``symmetric``) in the
    gated layout."""
    return pack_gated(qk.quantize_int4(weight, group, symmetric), block)


def unpack_gated(weight: GatedQuantizedWeight) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """``(codes [K, N], scales [G, N], mins [G, N] or None)`` as ``quant_kernels.unpack``
    gives them: the inputs of ONNX ``DequantizeLinear(block_size=group, axis=0)``."""
    per_block = weight.codes.transpose(1, 0, 2)
    if weight.bits == 8:
        codes = _unblocked(per_block, weight.n)
    else:
        both = np.concatenate([per_block & 15, per_block >> 4], axis=2)
        codes = _unblocked(both, weight.n)
        if weight.symmetric:
            codes = (codes.astype(np.int8) - 8).astype(np.int8)
    mins = None if weight.mins is None else _unblocked(weight.mins, weight.n).astype(np.float32)
    return np.ascontiguousarray(codes), _unblocked(weight.scales, weight.n).astype(np.float32), mins


# --- Kernel symbols ----------------------------------------------------------------------


def kernel_symbol(bits: int, symmetric: bool, m: int, k: int, n: int, group: int, block: int, per_channel: bool) -> str:
    """The global symbol of a gated quantized kernel, which ``parse_kernel_symbol`` reads back:
    ``gated_int{8|4|4s}_matmul_m{m}_k{k}_n{n}_g{group}_c{block}_{channel|scalar}``."""
    kind = f"{bits}{'s' if bits == 4 and symmetric else ''}"
    return f"gated_int{kind}_matmul_m{m}_k{k}_n{n}_g{group}_c{block}_{'channel' if per_channel else 'scalar'}"


def parse_kernel_symbol(name: str) -> dict | None:
    """The facts ``kernel_symbol`` spelled into ``name`` (``bits``, ``symmetric``, ``m``, ``k``,
    ``n``, ``group``, ``block``, ``per_channel``), or None for any other name."""
    match = _SYMBOL.fullmatch(name)
    if match is None:
        return None
    facts = {key: int(match[key]) for key in ("bits", "m", "k", "n", "group", "block")}
    return {**facts, "symmetric": facts["bits"] == 8 or match["sym"] == "s", "per_channel": match["gate"] == "channel"}


# --- Kernels -----------------------------------------------------------------------------


def gated_int8_matmul_func(
    m: int, k: int, n: int, group: int = GROUP, per_channel: bool = True, block: int | None = None
):
    """A TIR PrimFunc computing ``y = gate(x) @ W`` for ``W = quantize_gated_int8(...)``.

    Parameters, in order: ``x`` float32 [m, k], ``threshold`` float32 [k] (``per_channel``)
    or [1], ``codes`` int8 and ``scales`` float16 of the ``GatedQuantizedWeight``, ``y``
    float32 [m, n] (every element written). Global symbol ``kernel_symbol(8, True, m, k, n,
    group, block, per_channel)``.

    Args:
        m: rows of ``x``; any positive value (decode is 1 to 8).
        k: reduction size; need not be a multiple of ``group``.
        n: output size; need not be a multiple of 16.
        group: inputs per quantization group, as the weight was quantized.
        per_channel: one threshold per input (``[k]``) rather than one for all (``[1]``).
        block: columns per block, as the weight was packed; None for ``DEFAULT_BLOCK[8]``.

    Returns:
        A ``tvm.tirx.PrimFunc``.

    Raises:
        ValueError: for a non-positive size, a bad ``group`` or ``block``, or a non-bool
            ``per_channel``.
    """
    return _gated_quant_func(m, k, n, 8, True, group, per_channel, block)


def gated_int4_matmul_func(
    m: int, k: int, n: int, group: int = GROUP, symmetric: bool = False, per_channel: bool = True,
    block: int | None = None,
):
    """A TIR PrimFunc computing ``y = gate(x) @ W`` for ``W = quantize_gated_int4(...,
    symmetric)``.

    Parameters, in order: ``x`` float32 [m, k], ``threshold`` float32 [k] or [1], ``codes``
    uint8, ``scales`` float16 and (asymmetric only) ``mins`` float16 of the
    ``GatedQuantizedWeight``, ``y`` float32 [m, n]. Global symbol ``kernel_symbol(4,
    symmetric, ...)``. Arguments as ``gated_int8_matmul_func``'s; ``block`` None is
    ``DEFAULT_BLOCK[4]``.
    """
    return _gated_quant_func(m, k, n, 4, symmetric, group, per_channel, block)


def _gated_quant_func(m, k, n, bits, symmetric, group, per_channel, block):
    from tvm.script import tirx as T

    from targets.kernel_args import check_gate, func_attrs

    qk._check_sizes(m, k, n)
    qk._check_group(group)
    check_gate(per_channel, 1)
    block = _check_block(bits, block)
    code_bytes = block if bits == 8 else block // 2
    blocks = -(-n // block)
    groups = -(-k // group)
    has_mins = bits == 4 and not symmetric
    has_offset = bits == 4
    # Each input's codes of a block are walked in chunks of at most ACC_VECTORS vectors
    # (`slots`) of sums: 128 bytes of int8, 64 of int4.
    chunk_bytes = min(block, CHUNK_COLUMNS) * bits // 8
    chunks = code_bytes // chunk_bytes
    slots = chunk_bytes // LANES * (8 // bits)
    rows_per_tile = min(m, max(1, ACC_VECTORS // slots))
    full_tiles, tail_rows = divmod(m, rows_per_tile)
    full_blocks, tail_cols = divmod(n, block)
    code_dtype = "int8" if bits == 8 else "uint8"
    lines_per_input = -(-code_bytes // LINE_BYTES)
    symbol = kernel_symbol(bits, symmetric, m, k, n, group, block, per_channel)

    def threshold_at(threshold, kk):
        return threshold[kk] if per_channel else threshold[0]

    def is_active(x, threshold, r, kk):
        return T.abs(x[r, kk]) > threshold_at(threshold, kk)

    # --- Step 1: the active inputs, serially and without branches ----------------------

    @T.macro
    def list_active(x, threshold, active, starts, xa, xsum):
        count = T.alloc_buffer((1,), "int32")
        hit = T.alloc_buffer((1,), "int32")
        count[0] = 0
        for kk in range(k):
            if kk % group == 0:
                starts[kk // group] = count[0]
                if has_offset:
                    for r in range(m):
                        xsum[r, kk // group] = T.float32(0)
            hit[0] = 0
            # Written at the list's end whether or not kk is active: an inactive input is
            # overwritten by the next, as `count` does not move.
            active[count[0]] = kk
            for r in range(m):
                hit[0] = hit[0] | T.Cast("int32", is_active(x, threshold, r, kk))
                xa[r, count[0]] = T.if_then_else(is_active(x, threshold, r, kk), x[r, kk], T.float32(0))
                if has_offset:
                    xsum[r, kk // group] = xsum[r, kk // group] + xa[r, count[0]]
            count[0] = count[0] + hit[0]
        starts[groups] = count[0]

    # --- Step 2: per block, group and row tile ------------------------------------------

    per_half = chunk_bytes // LANES  # byte vectors per chunk

    def code_vector(codes, b, kk, ch, u):
        # Bytes 16 u .. 16 u + 15 of chunk ch of input kk's codes in block b: int8 codes of
        # columns ch * chunk_bytes + 16 u.., or int4 codes of those (low nibbles) and of
        # block / 2 + the same (high nibbles).
        return codes[kk, b, T.Ramp(ch * chunk_bytes + u * LANES, 1, LANES)]

    def low_codes(codes, b, kk, ch, u):
        if bits == 8:
            return T.Cast("float32x16", code_vector(codes, b, kk, ch, u))
        return T.Cast("float32x16", T.bitwise_and(code_vector(codes, b, kk, ch, u), T.Broadcast(T.uint8(15), LANES)))

    def high_codes(codes, b, kk, ch, u):
        return T.Cast("float32x16", T.shift_right(code_vector(codes, b, kk, ch, u), T.Broadcast(T.uint8(4), LANES)))

    @T.macro
    def prefetch_ahead(codes, active, count, b, i):
        # The codes of the active input PREFETCH_ROWS on, in this block or (past the list's
        # end) in the next, which this thread most likely runs next (T.parallel gives each
        # thread a contiguous range of blocks).
        ahead = i + PREFETCH_ROWS
        for line in range(lines_per_input):
            T.evaluate(
                prefetch(
                    T.address_of(
                        codes[
                            active[T.if_then_else(ahead < count, ahead, T.min(ahead - count, count - 1))],
                            b + T.if_then_else(ahead < count, 0, 1),
                            line * LINE_BYTES,
                        ]
                    )
                )
            )

    @T.macro
    def add_slot(sums, xa, i, slot, vector, m0, rows):
        for r in T.unroll(rows):
            sums[T.Ramp((r * slots + slot) * LANES, 1, LANES)] = (
                sums[T.Ramp((r * slots + slot) * LANES, 1, LANES)] + T.Broadcast(xa[m0 + r, i], LANES) * vector
            )

    @T.macro
    def add_input(sums, codes, xa, b, kk, i, ch, m0, rows):
        # sums[r, slot] += gate(x)[m0 + r, kk] * q[kk, the slot's 16 columns]: slot u the
        # low codes of byte vector u, slot per_half + u its high nibbles (int4).
        for u in T.unroll(per_half):
            add_slot(sums, xa, i, u, low_codes(codes, b, kk, ch, u), m0, rows)
            if bits == 4:
                add_slot(sums, xa, i, per_half + u, high_codes(codes, b, kk, ch, u), m0, rows)

    def finished(total, scales, mins, xsum, sums, b, g, r, slot, column, m0):
        at = T.Ramp(column, 1, LANES)
        group_sum = sums[T.Ramp((r * slots + slot) * LANES, 1, LANES)]
        scale = T.Cast("float32x16", scales[b, g, at])
        if has_mins:
            return total + scale * group_sum + T.Cast("float32x16", mins[b, g, at]) * T.Broadcast(xsum[m0 + r, g], LANES)
        if has_offset:
            return total + scale * (group_sum - T.Broadcast(T.float32(8) * xsum[m0 + r, g], LANES))
        return total + scale * group_sum

    @T.macro
    def finish_slot(totals, scales, mins, xsum, sums, b, g, slot, column, m0, rows):
        for r in T.unroll(rows):
            totals[m0 + r, T.Ramp(b * block + column, 1, LANES)] = finished(
                totals[m0 + r, T.Ramp(b * block + column, 1, LANES)], scales, mins, xsum, sums, b, g, r, slot, column, m0
            )

    @T.macro
    def group_tile(codes, scales, mins, active, xa, xsum, totals, bounds, b, g, m0, rows):
        for ch in range(chunks):
            sums = T.alloc_buffer((rows * slots * LANES,), "float32")
            for t in T.vectorized(rows * slots * LANES):
                sums[t] = T.float32(0)
            for i in range(bounds[0], bounds[1]):
                if ch == 0 and m0 == 0:
                    prefetch_ahead(codes, active, bounds[2], b, i)
                add_input(sums, codes, xa, b, active[i], i, ch, m0, rows)
            for u in T.unroll(per_half):
                finish_slot(totals, scales, mins, xsum, sums, b, g, u, ch * chunk_bytes + u * LANES, m0, rows)
                if bits == 4:
                    finish_slot(totals, scales, mins, xsum, sums, b, g, per_half + u,
                                block // 2 + ch * chunk_bytes + u * LANES, m0, rows)

    @T.macro
    def store(totals, y, b):
        if tail_cols == 0:
            for r in range(m):
                for c in T.vectorized(block):
                    y[r, b * block + c] = totals[r, b * block + c]
        else:
            if b < full_blocks:
                for r in range(m):
                    for c in T.vectorized(block):
                        y[r, b * block + c] = totals[r, b * block + c]
            else:
                for r in range(m):
                    for c in range(tail_cols):
                        y[r, b * block + c] = totals[r, b * block + c]

    @T.macro
    def block_task(codes, scales, mins, y, active, starts, xa, xsum, totals, b):
        for r in range(m):
            for c in T.vectorized(block):
                totals[r, b * block + c] = T.float32(0)
        for g in range(groups):
            # On the stack: `starts` is heap workspace, which LLVM cannot tell from the
            # totals it stores to.
            bounds = T.alloc_buffer((3,), "int32")
            bounds[0] = starts[g]
            bounds[1] = starts[g + 1]
            bounds[2] = starts[groups]
            if bounds[0] < bounds[1]:
                for t in range(full_tiles):
                    group_tile(codes, scales, mins, active, xa, xsum, totals, bounds, b, g, t * rows_per_tile,
                               rows_per_tile)
                if tail_rows > 0:
                    group_tile(codes, scales, mins, active, xa, xsum, totals, bounds, b, g,
                               full_tiles * rows_per_tile, tail_rows)
        store(totals, y, b)

    @T.macro
    def body(x, threshold, codes, scales, mins, y):
        active = T.alloc_buffer((k,), "int32")
        starts = T.alloc_buffer((groups + 1,), "int32")
        xa = T.alloc_buffer((m, k), "float32")
        xsum = T.alloc_buffer((m, groups), "float32")
        totals = T.alloc_buffer((m, blocks * block), "float32")
        list_active(x, threshold, active, starts, xa, xsum)
        for b in T.parallel(blocks):
            block_task(codes, scales, mins, y, active, starts, xa, xsum, totals, b)

    threshold_size = k if per_channel else 1
    code_shape = (k, blocks, code_bytes)
    param_shape = (blocks, groups, block)
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
            body(x, threshold, codes, scales, mins, y)

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
            body(x, threshold, codes, scales, None, y)

    return gated_quant_matmul
