"""Quantized dense matmul kernels for the CPU (int8 and int4 weights), in low-level TIR.

The kernels compute ``y[M, N] = x[M, K] @ W[K, N]`` (``x`` and ``y`` float32, ``M`` 1 to 8
at decode) from a ``W`` quantized in groups of ``group`` (32) consecutive inputs ``k`` of
one column, the dimension the kernels stream, so that a kernel which skips an input row
still reads whole groups. With ``g(k) = k // group`` and one float16 scale ``d`` per group
and column:

    int8 (llama.cpp's Q8_0):           W[k, j] = d[g(k), j] * q[k, j],        q in -127..127
    int4 (Q4_1, with minimums ``m``):   W[k, j] = d[g(k), j] * q[k, j] + m[g(k), j], q in 0..15
    int4 symmetric (Q4_0's format):    W[k, j] = d[g(k), j] * (q[k, j] - 8),  q in 0..15

``quantize_int8`` / ``quantize_int4`` round to nearest with a step that is never rounded
down to float16, so every weight is within half a step; ``dequantize_int8`` /
``dequantize_int4`` give the float32 ``W`` the codes represent, and ``unpack`` the codes
and scales as the inputs of ONNX ``DequantizeLinear(block_size=group)``.

Layout. As in ``targets.cpu.kernels`` the columns are cut into panels of 16 (zero-padded
at the end) and a panel is one contiguous stream, with ``K`` zero-padded to whole groups
(``Kp``). A panel's codes are 64-byte lines, each one cache line and one AVX-512 register
holding four inputs (int8) or eight (int4) of the panel's 16 columns::

    int8  codes[p, r, 4 j + b] = q[4 r + b, 16 p + j] + 128                 [P, Kp / 4, 64]
    int4  codes[p, r, 4 j + b] = q[8 r + b, 16 p + j] | q[8 r + 4 + b, 16 p + j] << 4
                                                                            [P, Kp / 8, 64]
    scales[p, g, j] = d[g, 16 p + j] (and mins likewise)                    [P, Kp / group, 16]

so byte lane ``4 j + b`` of a line is what one 32-bit lane ``j`` of ``vpdpbusd`` needs.
Bytes per weight: 1 + 2 / 32 = 1.0625 (int8), 0.5 + 4 / 32 = 0.625 (int4), 0.5 + 2 / 32 =
0.5625 (symmetric int4), against 4 for float32. Float16 rather than float32 scales: those
would read 1.125 / 0.75 / 0.625 bytes per weight, 6 % / 20 % / 11 % more at batch 1 where
bytes are time, for a scale precision (11 bits) far finer than the 8- or 4-bit codes;
``vcvtph2ps`` widens 16 of them in one instruction per group.

The two paths (``path=``), over the same arrays:

``vnni`` (AVX-512 VNNI, as llama.cpp does it): a serial prologue rounds each row of ``x``
per group to int8, ``x ~ s xq`` with ``s = max |x| / 127``, into a workspace, with the
sum of its codes. Per line and row, one ``vpdpbusd`` (int4: two, after a mask and a
shift) adds 64 products ``u8 x s8`` into 16 int32 lanes, exactly; per group the int32
lanes become float32 once: ``acc += float(sum q xq) * (d s)`` (``+ m s sum xq``), the
zero points folded into the int32 start value ``-zero_point * sum xq``. Rounding ``x``
is the only error beyond float32's: at most ``s / 2`` per input
(``quantize_activations`` is the exact reference).

``fma`` (portable TIR, no x86 intrinsics; used for int8 at one row, and wherever the
target lacks VNNI): each line is widened to 64 float32 lanes, scaled (and offset) per
lane and multiplied by the four ``x`` inputs it covers, repeated, into 64-lane
accumulators whose four lanes per column are added at the end. ``x`` stays float32.

Both paths give each parallel task a pair of panels (two streams, each prefetched
``PREFETCH_BYTES`` ahead into L2) and walk ``x`` in tiles of ``VNNI_ROW_TILE`` /
``FMA_ROW_TILE`` rows, as the fp32 kernel does.

Measured (``python benchmarks/quant_gemv.py``, then ``--rows 8``; AMD EPYC Zen 5, LLVM
``znver5``, 2 cores, ``TVM_NUM_THREADS=2``, weights from DRAM, medians of 7 rounds in
one process). The machine was shared with other sessions' test runs (load average 1-3,
other processes taking 0.6-0.9 of the 2 cores while these ran; in quieter minutes the
same fp32 call took anywhere from 0.6 to 1.5 ms), so only the ratios within one shape
mean anything. "of ideal" is the speedup over the fp32 kernel divided by the byte ratio;
"hot" the in-cache rate of the kernel on one copy (its compute ceiling, noisy here)::

    K x N      M  kernel    path  ms     GB/s  x fp32  ideal  of ideal  hot GB/s
    576x1536   1  fp32            0.103  34.5  1.00    1.00   100 %      75
                  int8      vnni  0.037  25.5  2.76    3.74    74 %      74
                  int8      fma   0.035  27.2  2.94    3.74    79 %      34
                  int4      vnni  0.027  20.9  3.82    6.32    60 %      68
                  int4 sym  vnni  0.024  21.1  4.28    7.01    61 %      67
    1536x576   1  fp32            0.133  26.7  1.00    1.00   100 %      71
                  int8      vnni  0.049  19.3  2.70    3.74    72 %      71
                  int8      fma   0.039  24.1  3.37    3.74    90 %      32
                  int4      vnni  0.031  18.3  4.32    6.32    68 %      52
                  int4 sym  vnni  0.028  18.0  4.71    7.01    67 %      56
    576x49152  1  fp32            3.054  37.2  1.00    1.00   100 %      41
                  int8      vnni  1.004  30.2  3.04    3.75    81 %      81
                  int8      fma   0.856  35.4  3.57    3.75    95 %      72
                  int4      vnni  0.613  29.2  4.98    6.34    79 %     144
                  int4 sym  vnni  0.542  29.8  5.64    7.04    80 %      84
    2048x5632  1  fp32            1.521  30.3  1.00    1.00   100 %      52
                  int8      vnni  0.560  21.9  2.72    3.76    72 %      81
                  int8      fma   0.447  27.5  3.40    3.76    91 %      37
                  int4      vnni  0.303  23.9  5.02    6.38    79 %      70
                  int4      fma   0.430  16.8  3.54    6.38    56 %      20
                  int4 sym  vnni  0.270  24.1  5.63    7.08    80 %     100
                  int4 sym  fma   0.475  13.7  3.20    7.08    45 %      30
    2048x5632  8  fp32            1.812  25.6  1.00    1.00   100 %      74
                  int8      vnni  0.705  17.7  2.57    3.71    69 %      68
                  int8      fma   1.601   7.8  1.13    3.71    31 %      14
                  int4      vnni  0.331  22.5  5.47    6.22    88 %      42
                  int4 sym  vnni  0.375  18.0  4.84    6.89    70 %      45

(The fma rows of int4 at the other shapes are 39-56 % of ideal at M = 1 and 13-19 % at
M = 8; ``benchmarks/quant_gemv.py`` prints them all.)

What the figures say:

- Which path. int4: ``vnni`` at every size (1.3-1.9x the ``fma`` path at M = 1, 3.7-7x at
  M = 8: ``fma`` spends a widen, a convert and two FMAs per weight, and its in-cache rate,
  15-30 GB/s, is below DRAM's). int8 at M = 1: ``fma`` was 7-29 % faster in 7 of 8
  paired rounds and 7 % slower in the eighth, although in cache ``vnni`` runs at twice
  its rate (70-80 against 32-37 GB/s); why ``vnni``'s stream from DRAM is slower was not
  found (not the prefetch distance, 2-16 KB, nor the prefetch's cache level). So
  ``default_path`` picks ``fma`` there, which also leaves ``x`` unrounded, and ``vnni``
  for M > 1, where ``fma`` is compute-bound (1.1x fp32 at M = 8). On a faster memory
  system ``fma``'s ceiling would show first: measure again there.
- Goal (75 % of the bytes-ideal at batch 1): met on the two large shapes by every default
  kernel (int8 fma 91-95 %, int4 79 %, int4 sym 80 %; the issue expected about 3.5x and
  6x over fp32, measured 3.4-3.6x and 5.0-5.6x). On SmolLM2's small layers (576x1536,
  1536x576) int8 meets it (79-90 %) and int4 does not (60-68 %). Those are not compute-bound in their loop (from cache
  the whole call takes 4-5 us, 50-70 GB/s, against an ideal of 16 us from DRAM); the gap
  is per call: its fixed costs (the call, the thread-pool launch, the activation
  prologue) and each thread's streams starting cold, which the fp32 kernel's 100 us call
  amortises. Not resolved here.
- At M = 8 the ``vnni`` kernels do 64 multiply-adds per instruction (``vpdpbusd``) and
  are compute-bound (int8 69 %, int4 70-88 %), still 2.6-5.5x faster than fp32.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from formats import quant
from targets.cpu.kernels import PANEL_WIDTH, panel_store
from targets.cpu.kernels import prefetch as _prefetch

#: Inputs (rows of ``W``) per quantization group, the llama.cpp block.
GROUP = 32
#: Bytes of one line of a panel: 16 columns x 4 inputs of int8, one cache line and one
#: AVX-512 register.
LINE_BYTES = 64
#: Inputs per 32-bit lane of a line (one ``vpdpbusd`` sums four products per lane).
QUAD = 4
#: Rows of ``x`` per pass over a panel pair, per path. The integer path keeps an int32
#: and an fp32 accumulator per row and panel (16 of the 32 registers at 4 rows); the fp32
#: path keeps 64 lanes (4 registers) per row and panel (16 at 2 rows).
VNNI_ROW_TILE = 4
FMA_ROW_TILE = 2
#: How far ahead of the current line each panel's codes are prefetched (see
#: ``targets.cpu.kernels.PREFETCH_BYTES``).
PREFETCH_BYTES = 4096
#: The kernels' two ways of multiplying; see the module docstring.
PATHS = ("vnni", "fma")
#: The CPU features the ``vnni`` path needs (LLVM's names).
VNNI_FEATURES = ("avx512bw", "avx512vnni")

_FP16_MAX = float(np.finfo(np.float16).max)


# --- Weights: quantize, pack, unpack ---------------------------------------------------


@dataclass(frozen=True)
class QuantizedWeight:
    """A ``[k, n]`` weight quantized in groups of ``group`` inputs, in the kernels' layout.

    ``codes`` uint8 ``[P, Kp * bits / 256, 64]`` with ``P = ceil(n / 16)`` panels and
    ``Kp`` = ``k`` rounded up to whole groups; ``scales`` (and ``mins``, asymmetric int4
    only) float16 ``[P, Kp / group, 16]``: see the module docstring for the bytes.
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
        """The weight's arrays in the order the kernel takes them (after ``x``)."""
        return [self.codes, self.scales] + ([] if self.mins is None else [self.mins])

    @property
    def nbytes(self) -> int:
        """Bytes the kernel reads per call: every code, scale and minimum."""
        return int(sum(a.nbytes for a in self.arrays()))


def _check_group(group: int) -> None:
    quant.check_group(group)


def _panel_major(per_group: np.ndarray) -> np.ndarray:
    """``[G, P * 16]`` -> ``[P, G, 16]``: a panel's scales are one contiguous run."""
    groups, columns = per_group.shape
    return np.ascontiguousarray(per_group.reshape(groups, columns // PANEL_WIDTH, PANEL_WIDTH).transpose(1, 0, 2))


def _pack_int8_codes(codes: np.ndarray) -> np.ndarray:
    """Signed codes ``[Kp, P * 16]`` -> lines ``[P, Kp / 4, 64]`` of ``code + 128``:
    byte ``4 j + b`` of line ``r`` of panel ``p`` holds input ``4 r + b``, column
    ``16 p + j``."""
    rows, columns = codes.shape
    biased = (codes.astype(np.int16) + 128).astype(np.uint8)
    lines = biased.reshape(rows // QUAD, QUAD, columns // PANEL_WIDTH, PANEL_WIDTH)
    return np.ascontiguousarray(lines.transpose(2, 0, 3, 1)).reshape(columns // PANEL_WIDTH, rows // QUAD, LINE_BYTES)


def _pack_int4_codes(codes: np.ndarray) -> np.ndarray:
    """Codes 0..15 ``[Kp, P * 16]`` -> lines ``[P, Kp / 8, 64]``: byte ``4 j + b`` of line
    ``r`` holds input ``8 r + b`` (low nibble) and ``8 r + 4 + b`` (high nibble) of
    column ``16 p + j``."""
    rows, columns = codes.shape
    halves = codes.astype(np.uint8).reshape(rows // 8, 2, QUAD, columns // PANEL_WIDTH, PANEL_WIDTH)
    bytes_ = halves[:, 0] | (halves[:, 1] << 4)
    return np.ascontiguousarray(bytes_.transpose(2, 0, 3, 1)).reshape(columns // PANEL_WIDTH, rows // 8, LINE_BYTES)


def _packed(dtype: str, k: int, n: int, group: int, codes: np.ndarray, scales: np.ndarray,
            mins: np.ndarray | None) -> QuantizedWeight:
    """The kernels' layout of panel-padded codes ``[Kp, P * 16]`` (signed for int8 and
    int4sym, 0..15 for int4) and float16 parameters ``[Kp / group, P * 16]``."""
    if dtype == "int8":
        lines = _pack_int8_codes(codes)
    else:
        lines = _pack_int4_codes(codes if dtype == "int4" else codes.astype(np.int16) + 8)
    return QuantizedWeight(8 if dtype == "int8" else 4, dtype != "int4", k, n, group, lines,
                           _panel_major(scales.astype(np.float16)), None if mins is None else _panel_major(mins.astype(np.float16)))


def _quantize(weight: np.ndarray, dtype: str, group: int) -> QuantizedWeight:
    if weight.ndim != 2 or weight.dtype != np.float32 or 0 in weight.shape:
        raise ValueError(f"expected a non-empty 2-D float32 weight, got {weight.ndim}-D {weight.dtype}")
    if not np.isfinite(weight).all():
        raise ValueError("the weight has infinite or NaN values")
    _check_group(group)
    k, n = weight.shape
    blocks, real = quant.grouped(weight, group, -(-n // PANEL_WIDTH) * PANEL_WIDTH)
    codes, scales, mins = quant.quantize_grouped(blocks, real, dtype)
    return _packed(dtype, k, n, group, codes.reshape(-1, blocks.shape[2]), scales, mins)


def pack(quantized: quant.Quantized) -> QuantizedWeight:
    """The kernels' layout of a ``formats.quant.Quantized`` weight (the inverse of
    ``unpack``): columns zero-padded to whole panels and inputs to whole groups, with the
    codes of zero (the padding multiplies zeros of ``x`` or writes no output).

    Raises:
        ValueError: for parameters beyond float16's range.
    """
    k, n = quantized.shape
    group = quantized.group
    _check_group(group)
    for values in (quantized.scales, quantized.mins):
        if values is not None and (not np.isfinite(values).all() or np.abs(values).max(initial=0) > _FP16_MAX):
            raise ValueError("the weight's scales are not finite float16 values")
    groups, columns = -(-k // group), -(-n // PANEL_WIDTH) * PANEL_WIDTH
    codes = np.zeros((groups * group, columns), np.uint8 if quantized.dtype == "int4" else np.int8)
    codes[:k, :n] = quantized.codes
    if quantized.mins is not None and k % group:
        # The padded inputs of the last group get the code nearest zero, as quantizing
        # zeros would give them.
        last_scale, last_min = quantized.scales[-1].astype(np.float64), quantized.mins[-1].astype(np.float64)
        zero = np.rint(np.divide(-last_min, last_scale, out=np.zeros_like(last_scale), where=last_scale > 0))
        codes[k:, :n] = np.clip(zero, 0, 15).astype(np.uint8)
    parameters = []
    for values in (quantized.scales, quantized.mins):
        padded = None
        if values is not None:
            padded = np.zeros((groups, columns), np.float32)
            padded[:, :n] = values
        parameters.append(padded)
    return _packed(quantized.dtype, k, n, group, codes, *parameters)


def quantize_int8(weight: np.ndarray, group: int = GROUP) -> QuantizedWeight:
    """Quantizes ``W`` [K, N] to int8 with one float16 scale per group of ``group`` inputs
    (llama.cpp's Q8_0 when ``group`` is 32; ``formats.quant.quantize_grouped``), in the
    layout ``int8_matmul_func`` reads.

    Raises:
        ValueError: for a weight that is not finite 2-D float32, a bad ``group``, or a
            range too large for float16 scales.
    """
    return _quantize(weight, "int8", group)


def quantize_int4(weight: np.ndarray, group: int = GROUP, symmetric: bool = False) -> QuantizedWeight:
    """Quantizes ``W`` [K, N] to int4 per group of ``group`` inputs, two codes per byte:
    asymmetric (llama.cpp's Q4_1), ``w ~ d q + m``, or symmetric (llama.cpp's Q4_0 rule:
    ``d = w* / -8`` for the group's largest-magnitude weight ``w*``, the opposite extreme
    clamped to +7), ``w ~ d (q - 8)`` (``formats.quant.quantize_grouped``), in the layout
    ``int4_matmul_func`` reads.

    Raises:
        ValueError: as ``quantize_int8``.
    """
    return _quantize(weight, "int4sym" if symmetric else "int4", group)


def _group_major(per_panel: np.ndarray, n: int) -> np.ndarray:
    """``[P, G, 16]`` float16 -> ``[G, n]`` float32."""
    panels, groups, width = per_panel.shape
    return per_panel.transpose(1, 0, 2).reshape(groups, panels * width)[:, :n].astype(np.float32)


def unpack(weight: QuantizedWeight) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """The codes as a ``[K, N]`` matrix and the per-group parameters as ``[G, N]``.

    Returns:
        ``(codes, scales, mins)``: ``codes`` int8 (the signed int8 codes; for symmetric
        int4 ``q - 8`` in -8..7) or uint8 (asymmetric int4, 0..15); ``scales`` float32
        ``[ceil(K / group), N]``; ``mins`` float32 of the same shape, or None. These are
        the inputs of ONNX ``DequantizeLinear`` with ``block_size = group`` along ``K``.
    """
    panels, lines, _ = weight.codes.shape
    if weight.bits == 8:
        grid = weight.codes.reshape(panels, lines, PANEL_WIDTH, QUAD).transpose(1, 3, 0, 2)
        codes = (grid.reshape(lines * QUAD, panels * PANEL_WIDTH).astype(np.int16) - 128).astype(np.int8)
    else:
        nibbles = weight.codes.reshape(panels, lines, PANEL_WIDTH, QUAD)
        both = np.stack([nibbles & 15, nibbles >> 4], axis=2)  # [P, lines, 2, 16, 4]
        codes = both.transpose(1, 2, 4, 0, 3).reshape(lines * 8, panels * PANEL_WIDTH)
        if weight.symmetric:
            codes = (codes.astype(np.int8) - 8).astype(np.int8)
    codes = codes[: weight.k, : weight.n]
    mins = None if weight.mins is None else _group_major(weight.mins, weight.n)
    return codes, _group_major(weight.scales, weight.n), mins


def _dequantize(weight: QuantizedWeight) -> np.ndarray:
    codes, scales, mins = unpack(weight)
    expand = lambda per_group: np.repeat(per_group, weight.group, axis=0)[: weight.k]  # noqa: E731
    dense = codes.astype(np.float32) * expand(scales)
    return dense if mins is None else dense + expand(mins)


def dequantize_int8(weight: QuantizedWeight) -> np.ndarray:
    """The float32 ``[K, N]`` weight the int8 codes represent, ``d q`` (exact in float32:
    an 11-bit scale times an 8-bit code)."""
    if weight.bits != 8:
        raise ValueError(f"expected an int8 weight, got int{weight.bits}")
    return _dequantize(weight)


def dequantize_int4(weight: QuantizedWeight) -> np.ndarray:
    """The float32 ``[K, N]`` weight the int4 codes represent: ``d (q - 8)`` (symmetric,
    exact) or ``d q + m`` (one float32 rounding, as ``DequantizeLinear`` then ``Add``)."""
    if weight.bits != 4:
        raise ValueError(f"expected an int4 weight, got int{weight.bits}")
    return _dequantize(weight)


# --- Kernels ---------------------------------------------------------------------------


def vnni_available(target=None) -> bool:
    """Whether ``target`` (default: this host's, ``targets.cpu.host.host_target``) has the
    AVX-512 VNNI and BW instructions the ``vnni`` path is built from."""
    import tvm

    from targets.cpu.host import host_target

    return bool(tvm.target.codegen.target_has_features(list(VNNI_FEATURES), target or host_target()))


def default_path(bits: int, m: int) -> str:
    """The faster path where both were measured (see the module docstring): ``fma`` for
    int8 at one row (as fast or faster, and ``x`` is not rounded), else ``vnni`` where the
    host has it."""
    if bits == 8 and m == 1:
        return "fma"
    return "vnni" if vnni_available() else "fma"


def _choose_path(path: str | None, bits: int, m: int) -> str:
    if path is None:
        return default_path(bits, m)
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS} or None, got {path!r}")
    return path


def _check_sizes(m: int, k: int, n: int) -> None:
    for name, value in (("m", m), ("k", k), ("n", n)):
        if not isinstance(value, (int, np.integer)) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _vpdpbusd(acc, unsigned_bytes, signed_bytes):
    """``acc + sum of four u8 x s8 products`` per 32-bit lane (AVX-512 VNNI)."""
    from tvm.script import tirx as T

    return T.call_llvm_pure_intrin("int32x16", "llvm.x86.avx512.vpdpbusd.512", acc, unsigned_bytes, signed_bytes)


def int8_matmul_func(m: int, k: int, n: int, group: int = GROUP, path: str | None = None):
    """A TIR PrimFunc computing ``y = x @ W`` for ``W = quantize_int8(...)``.

    Parameters, in order: ``x`` float32 [m, k], ``codes`` uint8 and ``scales`` float16 of
    the ``QuantizedWeight``, ``y`` float32 [m, n] (every element written). Global symbol
    ``int8_matmul_m{m}_k{k}_n{n}_g{group}_{path}``.

    Args:
        m: rows of ``x``; any positive value (decode is 1 to 8).
        k: reduction size; need not be a multiple of ``group``.
        n: output size; need not be a multiple of 16.
        group: inputs per quantization group, as the weight was quantized.
        path: ``"vnni"`` (x quantized to int8, integer dot products), ``"fma"`` (the
            weight dequantized to float32, fp32 FMAs; no x86 intrinsics), or None for
            ``default_path(8, m)``.

    Returns:
        A ``tvm.tirx.PrimFunc``.

    Raises:
        ValueError: for a non-positive size, a bad ``group`` or an unknown ``path``.
    """
    return _quant_matmul_func(m, k, n, 8, True, group, path)


def int4_matmul_func(m: int, k: int, n: int, group: int = GROUP, symmetric: bool = False, path: str | None = None):
    """A TIR PrimFunc computing ``y = x @ W`` for ``W = quantize_int4(..., symmetric)``.

    Parameters, in order: ``x`` float32 [m, k], ``codes`` uint8, ``scales`` float16 and
    (asymmetric only) ``mins`` float16 of the ``QuantizedWeight``, ``y`` float32 [m, n].
    Global symbol ``int4{s}_matmul_m{m}_k{k}_n{n}_g{group}_{path}`` (``s`` for symmetric).
    Arguments as ``int8_matmul_func``'s; ``path`` None is ``default_path(4, m)``.
    """
    return _quant_matmul_func(m, k, n, 4, symmetric, group, path)


def _quant_matmul_func(m: int, k: int, n: int, bits: int, symmetric: bool, group: int, path: str | None):
    from tvm.script import tirx as T

    _check_sizes(m, k, n)
    _check_group(group)
    path = _choose_path(path, bits, m)
    width = PANEL_WIDTH
    groups = -(-k // group)
    padded_k = groups * group
    full_groups = k // group
    panels = -(-n // width)
    pairs, lone_panel = divmod(panels, 2)
    inputs_per_line = QUAD * 8 // bits  # 4 for int8, 8 for int4
    lines_per_group = group // inputs_per_line
    lines = groups * lines_per_group
    ahead = PREFETCH_BYTES // LINE_BYTES
    ahead_groups = max(ahead // lines_per_group, 1)
    has_mins = bits == 4 and not symmetric
    # The integer path's code offset: int8 codes are stored + 128 (vpdpbusd's unsigned
    # operand), symmetric int4 codes carry their zero point 8.
    zero_point = 128 if bits == 8 else (8 if symmetric else 0)
    tile = VNNI_ROW_TILE if path == "vnni" else FMA_ROW_TILE
    rows_per_tile = min(m, tile)
    full_tiles, tail_rows = divmod(m, rows_per_tile)
    name = f"int{bits}{'s' if bits == 4 and symmetric else ''}_matmul_m{m}_k{k}_n{n}_g{group}_{path}"

    def scale_vector(scales, p, g):
        return T.Cast("float32x16", scales[p, g, T.Ramp(0, 1, width)])

    def line_bytes(codes, p, line):
        return codes[p, line, T.Ramp(0, 1, LINE_BYTES)]

    def low_nibbles(codes, p, line):
        return T.bitwise_and(line_bytes(codes, p, line), T.Broadcast(T.uint8(15), LINE_BYTES))

    def high_nibbles(codes, p, line):
        return T.shift_right(line_bytes(codes, p, line), T.Broadcast(T.uint8(4), LINE_BYTES))

    # Each stream is prefetched `ahead` lines on in its panel or, past the panel's end, in
    # the panel two on: the same stream of the task this thread runs next (T.parallel
    # gives each thread a contiguous range of tasks). Panels are short at decode (576
    # inputs of int4 are 72 lines), and each task would otherwise start its streams cold.
    # The scales (and minimums) are a stream of their own, prefetched once per group.
    @T.macro
    def prefetch_ahead(stream, p, i, distance, length):
        # stream[p, i + distance], or stream[p + 2, i + distance - length] past the end.
        T.evaluate(
            _prefetch(
                T.address_of(
                    stream[
                        p + T.if_then_else(i + distance < length, 0, 2),
                        T.if_then_else(i + distance < length, i + distance, i + distance - length),
                        0,
                    ]
                )
            )
        )

    @T.macro
    def prefetch_line(codes, p, line):
        prefetch_ahead(codes, p, line, ahead, lines)

    @T.macro
    def prefetch_group(params, p, g):
        prefetch_ahead(params, p, g, ahead_groups, groups)

    @T.macro
    def prefetch_parameters(scales, mins, p, g, pair):
        prefetch_group(scales, p, g)
        if has_mins:
            prefetch_group(mins, p, g)
        if pair:
            prefetch_group(scales, p + 1, g)
            if has_mins:
                prefetch_group(mins, p + 1, g)

    # Writes `rows` rows of 16 finished columns of panel p.
    store = panel_store(n)

    # --- The integer path: x quantized per group, vpdpbusd ----------------------------

    def x_word(xq, row, kk):
        # Four int8 of x (inputs kk..kk+3) in every 32-bit lane.
        return T.reinterpret(
            "int8x64", T.Broadcast(T.reinterpret("int32", xq[row, T.Ramp(kk, 1, QUAD)]), width)
        )

    @T.macro
    def fold_step(lanes, half, largest):
        for j in T.vectorized(half):
            if largest:
                lanes[j] = T.max(lanes[j], lanes[j + half])
            else:
                lanes[j] = lanes[j] + lanes[j + half]

    @T.macro
    def fold_lanes(lanes, largest):
        # lanes[0] <- the max (or sum) of lanes[0:16], by halving: four vector steps
        # instead of a serial chain of fifteen.
        fold_step(lanes, 8, largest)
        fold_step(lanes, 4, largest)
        fold_step(lanes, 2, largest)
        fold_step(lanes, 1, largest)

    @T.macro
    def quantize_group(x, xq, xscale, xsum, row, g, guarded):
        # x[row, g*group : (g+1)*group] -> int8 codes xq, step xscale and code sum xsum.
        peak = T.alloc_buffer((width,), "float32")
        total = T.alloc_buffer((width,), "int32")
        for j in T.vectorized(width):
            peak[j] = T.float32(0)
            total[j] = 0
        for h in range(group // width):
            for j in T.vectorized(width):
                if guarded:
                    peak[j] = T.max(
                        peak[j],
                        T.if_then_else(g * group + h * width + j < k, T.abs(x[row, T.min(g * group + h * width + j, k - 1)]), T.float32(0)),
                    )
                else:
                    peak[j] = T.max(peak[j], T.abs(x[row, g * group + h * width + j]))
        fold_lanes(peak, True)
        xscale[row, g] = peak[0] / T.float32(127)
        peak[1] = T.if_then_else(peak[0] > T.float32(0), T.float32(127) / peak[0], T.float32(0))
        for h in range(group // width):
            for j in T.vectorized(width):
                if guarded:
                    xq[row, g * group + h * width + j] = T.if_then_else(
                        g * group + h * width + j < k,
                        T.Cast("int8", T.nearbyint(x[row, T.min(g * group + h * width + j, k - 1)] * peak[1])),
                        T.int8(0),
                    )
                else:
                    xq[row, g * group + h * width + j] = T.Cast(
                        "int8", T.nearbyint(x[row, g * group + h * width + j] * peak[1])
                    )
                total[j] = total[j] + T.Cast("int32", xq[row, g * group + h * width + j])
        fold_lanes(total, False)
        xsum[row, g] = total[0]

    @T.macro
    def quantize_x(x, xq, xscale, xsum):
        for row in range(m):
            for g in range(full_groups):
                quantize_group(x, xq, xscale, xsum, row, g, False)
            if full_groups < groups:
                quantize_group(x, xq, xscale, xsum, row, full_groups, True)

    @T.macro
    def dot_line(iacc, codes, xq, p, line, m0, rows):
        for r in T.unroll(rows):
            if bits == 8:
                iacc[T.Ramp(r * width, 1, width)] = _vpdpbusd(
                    iacc[T.Ramp(r * width, 1, width)], line_bytes(codes, p, line), x_word(xq, m0 + r, line * QUAD)
                )
            else:
                iacc[T.Ramp(r * width, 1, width)] = _vpdpbusd(
                    _vpdpbusd(
                        iacc[T.Ramp(r * width, 1, width)], low_nibbles(codes, p, line), x_word(xq, m0 + r, line * 8)
                    ),
                    high_nibbles(codes, p, line),
                    x_word(xq, m0 + r, line * 8 + QUAD),
                )

    @T.macro
    def start_group(iacc, xsum, g, m0, rows):
        # sum (q + zero_point) xq - zero_point sum xq = sum q xq.
        for r in T.unroll(rows):
            for j in T.vectorized(width):
                iacc[r * width + j] = xsum[m0 + r, g] * (-zero_point)

    @T.macro
    def finish_group(acc, iacc, scales, mins, xscale, xsum, p, g, m0, rows):
        for r in T.unroll(rows):
            for j in T.vectorized(width):
                if has_mins:
                    acc[r * width + j] = (
                        acc[r * width + j]
                        + T.Cast("float32", iacc[r * width + j]) * (T.Cast("float32", scales[p, g, j]) * xscale[m0 + r, g])
                        + T.Cast("float32", mins[p, g, j]) * (xscale[m0 + r, g] * T.Cast("float32", xsum[m0 + r, g]))
                    )
                else:
                    acc[r * width + j] = acc[r * width + j] + T.Cast("float32", iacc[r * width + j]) * (
                        T.Cast("float32", scales[p, g, j]) * xscale[m0 + r, g]
                    )

    @T.macro
    def vnni_tile(codes, scales, mins, y, xq, xscale, xsum, p, m0, rows, pair):
        # One accumulator buffer per panel and kind, each under TVM's stack limit.
        first = T.alloc_buffer((rows * width,), "float32")
        ifirst = T.alloc_buffer((rows * width,), "int32")
        for t in T.vectorized(rows * width):
            first[t] = T.float32(0)
        if pair:
            second = T.alloc_buffer((rows * width,), "float32")
            isecond = T.alloc_buffer((rows * width,), "int32")
            for t in T.vectorized(rows * width):
                second[t] = T.float32(0)
        for g in range(groups):
            prefetch_parameters(scales, mins, p, g, pair)
            start_group(ifirst, xsum, g, m0, rows)
            if pair:
                start_group(isecond, xsum, g, m0, rows)
            for line in range(g * lines_per_group, (g + 1) * lines_per_group):
                prefetch_line(codes, p, line)
                dot_line(ifirst, codes, xq, p, line, m0, rows)
                if pair:
                    prefetch_line(codes, p + 1, line)
                    dot_line(isecond, codes, xq, p + 1, line, m0, rows)
            finish_group(first, ifirst, scales, mins, xscale, xsum, p, g, m0, rows)
            if pair:
                finish_group(second, isecond, scales, mins, xscale, xsum, p + 1, g, m0, rows)
        store(first, y, p, m0, rows)
        if pair:
            store(second, y, p + 1, m0, rows)

    @T.macro
    def vnni_task(codes, scales, mins, y, xq, xscale, xsum, p, pair):
        if full_tiles > 0:
            for t in range(full_tiles):
                vnni_tile(codes, scales, mins, y, xq, xscale, xsum, p, t * rows_per_tile, rows_per_tile, pair)
        if tail_rows > 0:
            vnni_tile(codes, scales, mins, y, xq, xscale, xsum, p, full_tiles * rows_per_tile, tail_rows, pair)

    @T.macro
    def vnni_body(x, codes, scales, mins, y):
        xq = T.alloc_buffer((m, padded_k), "int8")
        xscale = T.alloc_buffer((m, groups), "float32")
        xsum = T.alloc_buffer((m, groups), "int32")
        quantize_x(x, xq, xscale, xsum)
        for task in T.parallel(pairs + lone_panel):
            if lone_panel == 0:
                vnni_task(codes, scales, mins, y, xq, xscale, xsum, task * 2, True)
            else:
                if task < pairs:
                    vnni_task(codes, scales, mins, y, xq, xscale, xsum, task * 2, True)
                else:
                    vnni_task(codes, scales, mins, y, xq, xscale, xsum, task * 2, False)

    # --- The fp32 path: codes dequantized to float32, FMAs with fp32 x -----------------
    #
    # Lane 4 j + b of a 64-lane accumulator sums input 4 i + b of column j over the quads
    # i; the four lanes of each column are added at the end.

    def spread(vector16):
        # Lane 4 j + b <- lane j.
        return T.Shuffle([vector16] * QUAD, [lane // QUAD for lane in range(LINE_BYTES)])

    def x_quad(xf, row, kk):
        # x[row, kk : kk + 4] repeated in every group of four lanes.
        return T.Shuffle([xf[row, T.Ramp(kk, 1, QUAD)]] * width, list(range(LINE_BYTES)))

    def dequantized(codes, scales, mins, p, g, line, half):
        if bits == 8:
            signed = T.reinterpret("int8x64", T.bitwise_xor(line_bytes(codes, p, line), T.Broadcast(T.uint8(128), LINE_BYTES)))
            return T.Cast("float32x64", signed) * spread(scale_vector(scales, p, g))
        nibbles = low_nibbles(codes, p, line) if half == 0 else high_nibbles(codes, p, line)
        if has_mins:
            return T.Cast("float32x64", nibbles) * spread(scale_vector(scales, p, g)) + spread(
                T.Cast("float32x16", mins[p, g, T.Ramp(0, 1, width)])
            )
        return (T.Cast("float32x64", nibbles) - T.Broadcast(T.float32(8), LINE_BYTES)) * spread(scale_vector(scales, p, g))

    @T.macro
    def fma_line(acc, xf, codes, scales, mins, p, g, line, m0, rows):
        for r in T.unroll(rows):
            if bits == 8:
                acc[T.Ramp(r * LINE_BYTES, 1, LINE_BYTES)] = acc[T.Ramp(r * LINE_BYTES, 1, LINE_BYTES)] + x_quad(
                    xf, m0 + r, line * QUAD
                ) * dequantized(codes, scales, mins, p, g, line, 0)
            else:
                acc[T.Ramp(r * LINE_BYTES, 1, LINE_BYTES)] = (
                    acc[T.Ramp(r * LINE_BYTES, 1, LINE_BYTES)]
                    + x_quad(xf, m0 + r, line * 8) * dequantized(codes, scales, mins, p, g, line, 0)
                    + x_quad(xf, m0 + r, line * 8 + QUAD) * dequantized(codes, scales, mins, p, g, line, 1)
                )

    @T.macro
    def fold_quads(out, acc, rows):
        for r in T.unroll(rows):
            out[T.Ramp(r * width, 1, width)] = (
                T.Shuffle([acc[T.Ramp(r * LINE_BYTES, 1, LINE_BYTES)]], [QUAD * j for j in range(width)])
                + T.Shuffle([acc[T.Ramp(r * LINE_BYTES, 1, LINE_BYTES)]], [QUAD * j + 1 for j in range(width)])
                + T.Shuffle([acc[T.Ramp(r * LINE_BYTES, 1, LINE_BYTES)]], [QUAD * j + 2 for j in range(width)])
                + T.Shuffle([acc[T.Ramp(r * LINE_BYTES, 1, LINE_BYTES)]], [QUAD * j + 3 for j in range(width)])
            )

    @T.macro
    def fma_tile(xf, codes, scales, mins, y, p, m0, rows, pair):
        first = T.alloc_buffer((rows * LINE_BYTES,), "float32")
        for t in T.vectorized(rows * LINE_BYTES):
            first[t] = T.float32(0)
        if pair:
            second = T.alloc_buffer((rows * LINE_BYTES,), "float32")
            for t in T.vectorized(rows * LINE_BYTES):
                second[t] = T.float32(0)
        for g in range(groups):
            prefetch_parameters(scales, mins, p, g, pair)
            for line in range(g * lines_per_group, (g + 1) * lines_per_group):
                prefetch_line(codes, p, line)
                fma_line(first, xf, codes, scales, mins, p, g, line, m0, rows)
                if pair:
                    prefetch_line(codes, p + 1, line)
                    fma_line(second, xf, codes, scales, mins, p + 1, g, line, m0, rows)
        out = T.alloc_buffer((rows * width,), "float32")
        fold_quads(out, first, rows)
        store(out, y, p, m0, rows)
        if pair:
            fold_quads(out, second, rows)
            store(out, y, p + 1, m0, rows)

    @T.macro
    def fma_task(xf, codes, scales, mins, y, p, pair):
        if full_tiles > 0:
            for t in range(full_tiles):
                fma_tile(xf, codes, scales, mins, y, p, t * rows_per_tile, rows_per_tile, pair)
        if tail_rows > 0:
            fma_tile(xf, codes, scales, mins, y, p, full_tiles * rows_per_tile, tail_rows, pair)

    @T.macro
    def fma_panels(xf, codes, scales, mins, y):
        for task in T.parallel(pairs + lone_panel):
            if lone_panel == 0:
                fma_task(xf, codes, scales, mins, y, task * 2, True)
            else:
                if task < pairs:
                    fma_task(xf, codes, scales, mins, y, task * 2, True)
                else:
                    fma_task(xf, codes, scales, mins, y, task * 2, False)

    @T.macro
    def fma_body(x, codes, scales, mins, y):
        if padded_k == k:
            fma_panels(x, codes, scales, mins, y)
        else:
            # The last group reads whole quads of x: a zero-padded copy.
            xf = T.alloc_buffer((m, padded_k), "float32")
            for row in range(m):
                for kk in range(k):
                    xf[row, kk] = x[row, kk]
                for kk in range(k, padded_k):
                    xf[row, kk] = T.float32(0)
            fma_panels(xf, codes, scales, mins, y)

    @T.macro
    def body(x, codes, scales, mins, y):
        if path == "vnni":
            vnni_body(x, codes, scales, mins, y)
        else:
            fma_body(x, codes, scales, mins, y)

    code_lines = lines_per_group * groups
    if has_mins:

        @T.prim_func
        def quant_matmul(
            x: T.Buffer((m, k), "float32"),
            codes: T.Buffer((panels, code_lines, LINE_BYTES), "uint8"),
            scales: T.Buffer((panels, groups, width), "float16"),
            mins: T.Buffer((panels, groups, width), "float16"),
            y: T.Buffer((m, n), "float32"),
        ):
            T.func_attr({"global_symbol": name, "tir.noalias": True, "tirx.is_scheduled": True})
            body(x, codes, scales, mins, y)

    else:

        @T.prim_func
        def quant_matmul(
            x: T.Buffer((m, k), "float32"),
            codes: T.Buffer((panels, code_lines, LINE_BYTES), "uint8"),
            scales: T.Buffer((panels, groups, width), "float16"),
            y: T.Buffer((m, n), "float32"),
        ):
            T.func_attr({"global_symbol": name, "tir.noalias": True, "tirx.is_scheduled": True})
            body(x, codes, scales, None, y)

    return quant_matmul


def gather_rows(ids, codes, scales, mins, dtype: str, k: int, group: int):
    """A TE compute of rows ``ids`` of ``W^T`` (``[*ids.shape, k]`` float32) read from a
    packed quantized ``W`` [k, n] (``codes``, ``scales``, ``mins`` te tensors, ``mins`` None
    when symmetric): row ``v`` is column ``v`` of ``W``, at panel ``v // 16``, lane ``v %
    16`` of every line (the layout in the module docstring). For an embedding table tied
    to a quantized output projection."""
    from tvm import te, tirx

    shape = [int(d) for d in ids.shape]

    def row(*index):
        v, i = ids[index[:-1]].astype("int32"), index[-1]
        panel, lane = v // PANEL_WIDTH, v % PANEL_WIDTH
        scale = scales[panel, i // group, lane].astype("float32")
        if dtype == "int8":
            code = codes[panel, i // QUAD, QUAD * lane + i % QUAD].astype("int32") - 128
            return code.astype("float32") * scale
        byte = codes[panel, i // 8, QUAD * lane + i % QUAD].astype("int32")
        nibble = tirx.bitwise_and(tirx.shift_right(byte, (i % 8) // QUAD * 4), 15)
        if mins is None:
            return (nibble - 8).astype("float32") * scale
        return nibble.astype("float32") * scale + mins[panel, i // group, lane].astype("float32")

    return te.compute((*shape, k), row, name="quant_gather")


def quantize_activations(x: np.ndarray, group: int = GROUP) -> np.ndarray:
    """The ``x`` the ``vnni`` path multiplies by: ``x`` [M, K] float32 rounded as the kernel
    rounds it, per row and group of ``group`` inputs, to ``s q`` with ``s = max |x| / 127``
    and ``q = round(x * (127 / max |x|))`` (to even, in float32). The reference for that
    path; ``|x - s q| <= s / 2``."""
    _check_group(group)
    rows, k = x.shape
    groups = -(-k // group)
    padded = np.zeros((rows, groups * group), np.float32)
    padded[:, :k] = x
    grouped = padded.reshape(rows, groups, group)
    peak = np.abs(grouped).max(axis=2, keepdims=True)
    inverse = np.divide(np.float32(127), peak, out=np.zeros_like(peak), where=peak > 0)
    codes = np.rint(grouped * inverse)
    return (codes * (peak / np.float32(127))).reshape(rows, -1)[:, :k].astype(np.float32)
