"""Schedules for the operators TVM's default CPU pipeline leaves unscheduled.

Our matmul kernels arrive scheduled (``tirx.is_scheduled``). Everything else that
``LegalizeOps`` and ``FuseTIR`` produce (norms, softmax, elementwise chains, attention's
batched matmuls, gathers) is a plain loop nest that would run on one core with no SIMD.
Matmul-like functions go to :class:`ParallelFallback` first, norms to it too
(:class:`ReductionWithWiderEpilogue`), dlight's CPU ``Reduction`` rule then takes softmax, and :class:`ParallelFallback` takes the rest: it inlines what it can, parallelises the fused outer spatial loops over the cores and
vectorises the innermost spatial loop of elementwise blocks.
"""

from __future__ import annotations

import logging

import tvm
from tvm import s_tir, tirx
from tvm.s_tir import dlight
from tvm.s_tir.dlight.analysis import normalize_prim_func
from tvm.s_tir.dlight.base import ScheduleRule, try_inline
from tvm.s_tir.dlight.base.utils import get_extent
from tvm.target import Target

VECTOR_LANES = 16
#: Loop nests with fewer output elements than this run on one core: waking the thread
#: pool costs more than a decode step's norms, rotary embedding or residual add (a few
#: hundred to a few thousand elements) take on one core.
SERIAL_BELOW = 16384
_LOG = logging.getLogger(__name__)


def _is_contraction(sch, info) -> bool:
    """A reduction that multiplies two tensors (a matmul), not one that folds one (a sum)."""
    if info.is_injective():
        return False
    block = sch.get(info.block_rv)
    written = {region.source.name for region in block.writes}
    return len({region.source.name for region in block.reads} - written) >= 2


class ParallelFallback(ScheduleRule):
    """Parallel outer loops and vectorised inner loops for any remaining PrimFunc.

    Args:
        contractions_only: apply only to functions holding a matmul-like block, so that
            this rule can run before dlight's ``Reduction`` (which would keep the
            reduction innermost and leave a matmul scalar) and after it for the rest.
    """

    def __init__(self, contractions_only: bool = False):
        self.contractions_only = contractions_only

    def apply(self, func: tirx.PrimFunc, target: Target, _: bool):
        if not isinstance(func, tirx.PrimFunc) or target.kind.name != "llvm":
            return None
        try:
            return self._apply(func)
        except (s_tir.schedule.ScheduleError, tvm.error.InternalError) as exc:
            _LOG.debug("ParallelFallback skipped %s: %s", func.attrs.get("global_symbol") if func.attrs else "", exc)
            # A loop nest this rule does not understand stays as TVM made it: correct,
            # only slower.
            return None

    def _apply(self, func: tirx.PrimFunc):
        sch = s_tir.Schedule(func)
        block_infos = normalize_prim_func(sch)
        if block_infos is None:
            return None
        block_infos = try_inline(sch, block_infos)
        if self.contractions_only and not any(_is_contraction(sch, info) for info in block_infos):
            return None
        for info in block_infos:
            block = info.block_rv
            loops = sch.get_loops(block)
            if not loops:
                continue
            kinds = info.dom_kind()
            spatial = [loop for loop, kind in zip(loops, kinds) if kind == "S"]
            others = [loop for loop, kind in zip(loops, kinds) if kind != "S"]
            if not spatial or any(kind not in "SR" for kind in kinds):
                continue
            if info.is_injective():
                _schedule_elementwise(sch, block, spatial)
            else:
                _schedule_reduction(sch, block, spatial, others)
        return sch


class ReductionWithWiderEpilogue(ScheduleRule):
    """Norms: a reduction to fewer values than the elementwise code after it writes
    (RMSNorm: one mean per row, then 576 outputs per row).

    dlight's CPU ``Reduction`` rule parallelises such a function over the epilogue's
    elements and computes the reduction inside that loop: once per output element (576
    times the work; 160-230 us instead of a few for one SmolLM2 row), with every thread
    writing the same reduction buffer. :class:`ParallelFallback` computes the reduction
    once per row and then the epilogue in parallel.
    """

    def apply(self, func: tirx.PrimFunc, target: Target, _: bool):
        if not isinstance(func, tirx.PrimFunc) or target.kind.name != "llvm":
            return None
        try:
            sch = s_tir.Schedule(func)
            infos = normalize_prim_func(sch)
            if infos is None:
                return None
            reduced = [_spatial_size(sch, info) for info in infos if not info.is_injective() and not _is_contraction(sch, info)]
            written = [_spatial_size(sch, info) for info in infos if info.is_injective()]
            if not reduced or not written or max(written) <= min(reduced):
                return None
        except (s_tir.schedule.ScheduleError, tvm.error.InternalError):
            return None
        return ParallelFallback().apply(func, target, _)


def _spatial_size(sch, info) -> float:
    return _elements(sch, [loop for loop, kind in zip(sch.get_loops(info.block_rv), info.dom_kind()) if kind == "S"])


def _split_vectorize(sch, loop) -> bool:
    extent = get_extent(sch, loop)
    if not isinstance(extent, int) or extent % VECTOR_LANES:
        return False
    _, lanes = sch.split(loop, factors=[None, VECTOR_LANES])
    sch.vectorize(lanes)
    return True


def _parallel(sch, loops, elements: float) -> None:
    """The loops fused, and parallel when the block writes at least ``SERIAL_BELOW`` elements."""
    fused = sch.fuse(*loops) if len(loops) > 1 else loops[0]
    if elements >= SERIAL_BELOW:
        sch.parallel(fused)


def _elements(sch, loops) -> float:
    size = 1.0
    for loop in loops:
        extent = get_extent(sch, loop)
        size *= extent if isinstance(extent, int) else float("inf")
    return size


def _schedule_elementwise(sch, block, spatial) -> None:
    """Outer loops fused and parallel, the innermost vectorised when it tiles by 16."""
    elements = _elements(sch, spatial)
    inner = spatial.pop() if len(spatial) > 1 else None
    _parallel(sch, spatial, elements)
    if inner is not None:
        _split_vectorize(sch, inner)


def _schedule_reduction(sch, block, spatial, reductions) -> None:
    """Matmul-like blocks (attention's batched matmuls): ``for b, i (parallel): for k:
    for j``, so each step is a broadcast-multiply-add over a contiguous row of outputs.

    TIR refuses to vectorise a spatial loop inside a reduction's update block, but the
    innermost ``j`` loop is contiguous and alias-free, which LLVM's loop vectoriser takes.
    """
    elements = _elements(sch, spatial) * _elements(sch, reductions)
    inner = spatial[-1] if len(spatial) > 1 else None
    extent = get_extent(sch, inner) if inner is not None else None
    if isinstance(extent, int) and extent % VECTOR_LANES == 0:
        outer = spatial[:-1]
        sch.reorder(*outer, *reductions, inner)
        _parallel(sch, outer, elements)
        sch.decompose_reduction(block, reductions[0])
        return
    sch.reorder(*spatial, *reductions)
    _parallel(sch, spatial, elements)
    if reductions:
        sch.decompose_reduction(block, reductions[0])


def schedule_pass():
    """The pass that schedules every PrimFunc not already scheduled."""
    return dlight.ApplyDefaultSchedule(
        ParallelFallback(contractions_only=True), ReductionWithWiderEpilogue(), dlight.cpu.Reduction(), ParallelFallback()
    )
