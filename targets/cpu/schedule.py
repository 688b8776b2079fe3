"""Schedules for the operators TVM's default CPU pipeline leaves unscheduled.

Our matmul kernels arrive scheduled (``tirx.is_scheduled``). Everything else that
``LegalizeOps`` and ``FuseTIR`` produce (norms, softmax, elementwise chains, attention's
batched matmuls, gathers) is a plain loop nest that would run on one core with no SIMD.
dlight's CPU ``Reduction`` rule takes softmax and norms; :class:`ParallelFallback` takes the
rest: it inlines what it can, parallelises the fused outer spatial loops over the cores and
vectorises the innermost spatial loop of elementwise blocks.
"""

from __future__ import annotations

from tvm import s_tir, tirx
from tvm.s_tir import dlight
from tvm.s_tir.dlight.analysis import normalize_prim_func
from tvm.s_tir.dlight.base import ScheduleRule, try_inline
from tvm.s_tir.dlight.base.utils import get_extent
from tvm.target import Target

VECTOR_LANES = 16


class ParallelFallback(ScheduleRule):
    """Parallel outer loops and vectorised inner loops for any remaining PrimFunc."""

    def apply(self, func: tirx.PrimFunc, target: Target, _: bool):
        if not isinstance(func, tirx.PrimFunc) or target.kind.name != "llvm":
            return None
        sch = s_tir.Schedule(func)
        block_infos = normalize_prim_func(sch)
        if block_infos is None:
            return None
        block_infos = try_inline(sch, block_infos)
        for info in block_infos:
            block = info.block_rv
            loops = sch.get_loops(block)
            if not loops:
                continue
            kinds = info.dom_kind()
            spatial = [loop for loop, kind in zip(loops, kinds) if kind == "S"]
            others = [loop for loop, kind in zip(loops, kinds) if kind != "S"]
            if not spatial:
                continue
            sch.reorder(*spatial, *others)
            inner = None
            if info.is_injective() and len(spatial) > 1:
                extent = get_extent(sch, spatial[-1])
                if isinstance(extent, int) and extent % VECTOR_LANES == 0:
                    inner = spatial.pop()
            outer = sch.fuse(*spatial) if len(spatial) > 1 else spatial[0]
            sch.parallel(outer)
            if inner is not None:
                _, lanes = sch.split(inner, factors=[None, VECTOR_LANES])
                sch.vectorize(lanes)
            if others and not info.is_injective():
                sch.decompose_reduction(block, others[0])
        return sch


def schedule_pass():
    """The pass that schedules every PrimFunc not already scheduled."""
    return dlight.ApplyDefaultSchedule(dlight.cpu.Reduction(), ParallelFallback())
