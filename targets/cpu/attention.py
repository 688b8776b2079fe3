"""Decode-step attention as one CPU kernel (``targets.attention`` finds it in the graph).

For each key/value head ``h`` and each of the ``group`` query heads that share it
(grouped-query attention), over the cache slots ``j`` with ``mask[j]`` set and the new
token::

    s_j   = scale * (q[h, g] . key[h, :, j])          key stored transposed: [heads, dim, slots]
    p     = softmax([s_j for valid j] + [new_score[h, g]])
    y[h, g] = sum_j p_j value[h, j] + p_new new_value[h]

Slots past the last set mask bit are never read, so a step at position 40 of a 256-slot
cache reads 41 slots of keys and values, not 256; set bits before it are read, clear
ones skipped. This is exactly the masked softmax of the graph (its fill value is -inf or
below -1e30, whose exponential is 0).
"""

from __future__ import annotations

from targets.cpu.simd import LANES
from targets.kernel_args import check_sizes, func_attrs

#: Slots per chunk of the online softmax: its scores are a 512-byte stack buffer.
CHUNK = 128


def decode_attention_func(heads: int, group: int, dim: int, slots: int, scale: float):
    """A TIR PrimFunc for one decode step's attention over a cache of ``slots``.

    Parameters, in order: ``q`` float32 [heads, group, dim], ``key`` float32 [heads, dim,
    slots], ``value`` float32 [heads, slots, dim], ``mask`` bool [slots], ``new_score``
    float32 [heads, group] (the new token's score, already scaled), ``new_value`` float32
    [heads, dim], ``y`` float32 [heads, group, dim]. Parallel over the heads x group query
    heads. Global symbol ``decode_attention_h{heads}_g{group}_d{dim}_s{slots}``.

    The slots are visited in chunks of ``CHUNK`` with an online softmax (the running
    maximum rescales the sums when it grows), so every buffer is a stack buffer under
    TVM's 1024-byte limit. A chunk's scores are computed sixteen slots at a time, with four
    independent accumulators over ``dim``; the vectors never read past ``slots``, and a
    scalar tail takes the slots a whole vector would overrun.

    Raises:
        ValueError: for a non-positive size.
    """
    from tvm.script import tirx as T

    check_sizes(heads=heads, group=group, dim=dim, slots=slots)
    queries = heads * group
    quads = dim // 4

    @T.prim_func
    def decode_attention(
        q: T.Buffer((heads, group, dim), "float32"),
        key: T.Buffer((heads, dim, slots), "float32"),
        value: T.Buffer((heads, slots, dim), "float32"),
        mask: T.Buffer((slots,), "bool"),
        new_score: T.Buffer((heads, group), "float32"),
        new_value: T.Buffer((heads, dim), "float32"),
        y: T.Buffer((heads, group, dim), "float32"),
    ):
        T.func_attr(func_attrs(f"decode_attention_h{heads}_g{group}_d{dim}_s{slots}"))
        for hg in T.parallel(queries):
            # span: [0] slots to visit (one past the last set bit), [1] this chunk's first
            # slot, [2] its width, [3] its whole vectors of sixteen slots.
            span = T.alloc_buffer((4,), "int32")
            # state: the running maximum, the softmax's denominator, the rescale factor.
            state = T.alloc_buffer((3,), "float32")
            query = T.alloc_buffer((dim,), "float32")
            scores = T.alloc_buffer((CHUNK,), "float32")
            partial = T.alloc_buffer((4 * LANES,), "float32")
            acc = T.alloc_buffer((dim,), "float32")
            span[0] = 0
            for j in range(slots):
                if mask[j]:
                    span[0] = j + 1
            for d in range(dim):
                query[d] = q[hg // group, hg % group, d]
            state[0] = new_score[hg // group, hg % group]
            state[1] = T.float32(1)
            for d in range(dim):
                acc[d] = new_value[hg // group, d]
            for c in range((span[0] + CHUNK - 1) // CHUNK):
                span[1] = c * CHUNK
                span[2] = T.min(CHUNK, span[0] - span[1])
                span[3] = T.min((span[2] + LANES - 1) // LANES, (slots - span[1]) // LANES)
                for v in range(span[3]):
                    for t in T.vectorized(4 * LANES):
                        partial[t] = T.float32(0)
                    for dq in range(quads):
                        for r in T.unroll(4):
                            partial[T.Ramp(r * LANES, 1, LANES)] = partial[T.Ramp(r * LANES, 1, LANES)] + T.Broadcast(
                                query[dq * 4 + r], LANES
                            ) * key[hg // group, dq * 4 + r, T.Ramp(span[1] + v * LANES, 1, LANES)]
                    for d in range(quads * 4, dim):
                        partial[T.Ramp(0, 1, LANES)] = partial[T.Ramp(0, 1, LANES)] + T.Broadcast(
                            query[d], LANES
                        ) * key[hg // group, d, T.Ramp(span[1] + v * LANES, 1, LANES)]
                    for t in T.vectorized(LANES):
                        scores[v * LANES + t] = (partial[t] + partial[LANES + t] + partial[2 * LANES + t]
                                                 + partial[3 * LANES + t]) * T.float32(scale)
                for j in range(span[3] * LANES, span[2]):
                    scores[j] = T.float32(0)
                    for d in range(dim):
                        scores[j] = scores[j] + query[d] * key[hg // group, d, span[1] + j]
                    scores[j] = scores[j] * T.float32(scale)
                state[2] = state[0]
                for j in range(span[2]):
                    if mask[span[1] + j]:
                        state[0] = T.max(state[0], scores[j])
                state[2] = T.exp(state[2] - state[0])
                state[1] = state[1] * state[2]
                for d in T.vectorized(dim):
                    acc[d] = acc[d] * state[2]
                for j in range(span[2]):
                    if mask[span[1] + j]:
                        scores[j] = T.exp(scores[j] - state[0])
                        state[1] = state[1] + scores[j]
                        for d in T.vectorized(dim):
                            acc[d] = acc[d] + scores[j] * value[hg // group, span[1] + j, d]
            for d in T.vectorized(dim):
                y[hg // group, hg % group, d] = acc[d] / state[1]

    return decode_attention
