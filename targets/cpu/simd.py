"""Vector helpers of the CPU kernels: AVX-512 lanes, LLVM intrinsics and the prefetch.

Each helper returns one PrimExpr (or, for ``lane_sum_macro``, a TVMScript macro), so it is
inlined where a kernel uses it inside its TVMScript function. None binds a vector value to
a name: in TVMScript a vector-typed ``v = expr`` is given a memory slot that LLVM does not
remove, so vectors are written inline or into a small buffer. TVM scalarises a vector
load at vector indices (16 inserts, no gather), so the AVX-512 gather and expand are
called as LLVM intrinsics; and the ``llvm.masked.*`` intrinsics of LLVM 22 take no
alignment argument.
"""

from __future__ import annotations

#: fp32 lanes of one AVX-512 vector: the unit of the gather, expand and FMA steps.
LANES = 16
#: How far ahead of the current position each weight stream is prefetched. One hardware
#: prefetcher stream keeps too few reads in flight to reach DRAM bandwidth.
PREFETCH_BYTES = 4096

_LLVM_PREFETCH_READ = 0
#: Locality 2 (``prefetcht1``): into L2, not L1. Measured on this Zen 4 (one process, five
#: rounds, weights from DRAM): a prefetch into L1 holds one of L1's few miss buffers until
#: the line arrives, so L1 prefetches alone cannot keep enough reads in flight; into L2
#: the 16x1-block dual kernel ran 1.3-1.5x faster, the gated one ~15 % and the dense one
#: ~5 %. Prefill still reuses each panel from L2.
_LLVM_PREFETCH_KEEP_IN_L2 = 2
_LLVM_PREFETCH_DATA_CACHE = 1


def prefetch(address):
    """``llvm.prefetch`` of the cache line at ``address`` into L2; never faults, even past
    the end of a buffer. Returns one PrimExpr, to ``T.evaluate`` inside a kernel."""
    from tvm.script import tirx as T

    return T.call_llvm_intrin(
        "void",
        "llvm.prefetch.p0",
        address,
        _LLVM_PREFETCH_READ,
        _LLVM_PREFETCH_KEEP_IN_L2,
        _LLVM_PREFETCH_DATA_CACHE,
    )


def bit_lanes(bits):
    """The 16-lane mask whose lane ``l`` is bit ``l`` of the int32 ``bits`` (one kmov)."""
    from tvm.script import tirx as T

    one_hot = T.shift_left(T.Broadcast(1, LANES), T.Ramp(0, 1, LANES))
    return T.bitwise_and(T.Broadcast(bits, LANES), one_hot) != T.Broadcast(0, LANES)


def lanes_below(count):
    """The 16-lane mask of lanes ``0 .. count - 1``."""
    from tvm.script import tirx as T

    return T.Ramp(0, 1, LANES) < T.Broadcast(count, LANES)


def all_lanes():
    """The 16-lane mask with every lane set."""
    from tvm.script import tirx as T

    return T.Broadcast(T.bool(True), LANES)


def expand(address, bits):
    """``vexpandps``: the next ``popcount(bits)`` floats at ``address`` into the set lanes."""
    from tvm.script import tirx as T

    return T.call_llvm_intrin(
        f"float32x{LANES}",
        f"llvm.masked.expandload.v{LANES}f32",
        address,
        bit_lanes(bits),
        T.Broadcast(T.float32(0), LANES),
    )


def masked_load(dtype, address, mask):
    """16 elements at ``address`` where ``mask`` is set, zero elsewhere; reads no others."""
    from tvm.script import tirx as T

    llvm_type = {"float32": "f32", "int32": "i32", "int16": "i16"}[dtype]
    return T.call_llvm_intrin(
        f"{dtype}x{LANES}",
        f"llvm.masked.load.v{LANES}{llvm_type}.p0",
        address,
        mask,
        T.Broadcast(T.cast(0, dtype), LANES),
    )


def gather(row_address, indices, mask):
    """``vgatherdps``: ``row[indices[l]]`` in the lanes where ``mask`` is set, else zero.

    TVM scalarises an indexed vector load (16 inserts), so the AVX-512 gather is called
    directly; ``indices`` is an int32x16 vector of element offsets from ``row_address``.
    """
    from tvm.script import tirx as T

    return T.call_llvm_pure_intrin(
        f"float32x{LANES}",
        "llvm.x86.avx512.mask.gather.dps.512",
        T.Broadcast(T.float32(0), LANES),
        row_address,
        indices,
        mask,
        4,  # scale: bytes per float32
    )


def bit_chunk(bits, row, chunk, bytes_in_chunk):
    """Bits ``16 chunk .. 16 chunk + 15`` of ``bits[row]`` as an int32 (two byte loads)."""
    from tvm.script import tirx as T

    low = T.Cast("int32", bits[row, chunk * 2])
    if bytes_in_chunk == 1:
        return low
    return T.bitwise_or(low, T.shift_left(T.Cast("int32", bits[row, chunk * 2 + 1]), 8))


def lane_sum_macro():
    """A macro ``lane_sum(acc, base, width)`` leaving ``sum(acc[base:base+width])`` in
    ``acc[base]`` by halving (``width`` a power of two up to 16): a few shuffles and adds
    instead of a serial chain of ``width - 1`` scalar adds."""
    from tvm.script import tirx as T

    @T.macro
    def lane_sum(acc, base, width):
        if width >= 16:
            for t in T.vectorized(8):
                acc[base + t] = acc[base + t] + acc[base + t + 8]
        if width >= 8:
            for t in T.vectorized(4):
                acc[base + t] = acc[base + t] + acc[base + t + 4]
        if width >= 4:
            for t in T.vectorized(2):
                acc[base + t] = acc[base + t] + acc[base + t + 2]
        if width >= 2:
            acc[base] = acc[base] + acc[base + 1]

    return lane_sum
