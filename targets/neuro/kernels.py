"""The per-core event kernel, written in TIR and compiled by TVM for the host.

A core of a synaptic layer owns output columns ``core_cols[c] : core_cols[c + 1]`` and a
synapse table (``targets.neuro.mapping.synapse_tables``). For every row ``r`` (token) its
work is exactly what the chip's core would do with the events it receives::

    y[r, j] = 0                                    for the core's columns j
    for each event (k, v) of row r:                the nonzero inputs, after the gate
        for p in row_ptr[c, k] : row_ptr[c, k + 1]:    the nonzero weights of row k
            y[r, cols[p]] += v * vals[p]               one synaptic operation

One kernel serves every layer and core count: all sizes are symbolic, and the host runs
the simulated cores in parallel (``T.parallel`` over cores; cores own disjoint columns,
so they never write the same output).
"""

from __future__ import annotations

from pathlib import Path

SYMBOL = "neuro_events"


def event_kernel():
    """The PrimFunc ``neuro_events(ev_ptr, ev_idx, ev_val, row_ptr, cols, vals, core_cols, y)``."""
    from tvm.script import tirx as T

    @T.prim_func
    def neuro_events(ev_ptr_h: T.handle, ev_idx_h: T.handle, ev_val_h: T.handle, row_ptr_h: T.handle,
                     cols_h: T.handle, vals_h: T.handle, core_cols_h: T.handle, y_h: T.handle):
        T.func_attr({"tir.noalias": True, "global_symbol": SYMBOL})
        rows = T.int32()
        events = T.int32()
        cores = T.int32()
        row_ptr_width = T.int32()
        nnz = T.int32()
        n = T.int32()
        ev_ptr = T.match_buffer(ev_ptr_h, (rows + 1,), "int32")
        ev_idx = T.match_buffer(ev_idx_h, (events,), "int32")
        ev_val = T.match_buffer(ev_val_h, (events,), "float32")
        row_ptr = T.match_buffer(row_ptr_h, (cores, row_ptr_width), "int32")
        cols = T.match_buffer(cols_h, (nnz,), "int32")
        vals = T.match_buffer(vals_h, (nnz,), "float32")
        core_cols = T.match_buffer(core_cols_h, (cores + 1,), "int32")
        y = T.match_buffer(y_h, (rows, n), "float32")
        for core in T.parallel(cores):
            for r in range(rows):
                for j in range(core_cols[core], core_cols[core + 1]):
                    y[r, j] = T.float32(0)
                for e in range(ev_ptr[r], ev_ptr[r + 1]):
                    for p in range(row_ptr[core, ev_idx[e]], row_ptr[core, ev_idx[e] + 1]):
                        y[r, cols[p]] = y[r, cols[p]] + ev_val[e] * vals[p]

    return neuro_events


def build_event_library(path: Path) -> None:
    """Compiles the event kernel for this host into the shared library ``path``."""
    import tvm

    from targets.cpu.host import host_target

    executable = tvm.compile(tvm.IRModule({SYMBOL: event_kernel()}), target=host_target())
    executable.export_library(str(path))
