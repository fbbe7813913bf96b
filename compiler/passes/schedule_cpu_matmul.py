"""ScheduleCPUMatmul: a default CPU schedule for the matmuls TVM's legalization leaves as naive loops.

TVM 0.27's CPU pipeline schedules nothing and dlight has no CPU matmul rule, so an imported graph's
``matmul`` blocks (ONNX MatMul/Gemm, attention's batched matmuls, with fused epilogues such as a bias add or
SiLU) run as scalar loop nests. For every PrimFunc with a block named ``matmul`` whose iterators are
spatial except the last (the reduction) and whose innermost spatial extent is a multiple of the SIMD width
or symbolic (attention's ``q @ k^T`` over the sequence; the last tile is predicated), this pass applies:

* a register tile of ``rows`` output rows × ``2 * lanes`` (or ``lanes``) output columns: the rows loop is
  split by ``rows`` (a predicate covers a symbolic sequence length), the columns by the tile width;
* the reduction split by ``kstep`` (when its extent is static and divisible) and unrolled;
* loop order ``outer spatial, row tiles, column tiles, k, rows, k-step, columns``; the row and column tiles
  fused and run in parallel; the column loop vectorized;
* the reduction's init decomposed at the k loop (vectorized);
* the epilogue blocks (element-wise consumers fused by FuseTIR) moved under the parallel tile loop and
  vectorized, so they run on the tile while it is in cache.

Functions that are already scheduled (hand-written TIR with parallel loops, or marked ``xpuc.scheduled``)
and matmuls that do not fit the pattern are left as they are.
"""

from __future__ import annotations

import tvm
from tvm import tirx
from tvm.s_tir import Schedule

ATTR = "xpuc.scheduled"


def _static(extent) -> int | None:
    return int(extent) if isinstance(extent, (int, tirx.IntImm)) else None


def _has_parallel(func: tirx.PrimFunc) -> bool:
    """Already scheduled by hand? (TVM 0.27's Python API has no TIR visitor; the printed form tells.)"""
    return "T.parallel(" in func.script()


def schedule_matmul(func: tirx.PrimFunc, rows: int = 8, lanes: int = 16, kstep: int = 4) -> tirx.PrimFunc | None:
    """The scheduled function, or None when ``func`` has no matmul block of the supported form."""
    sch = Schedule(func)
    blocks = sch.get_child_blocks(sch.get_sblock("root"))
    mm = [b for b in blocks if sch.get(b).name_hint == "matmul"]
    if len(mm) != 1:
        return None
    b = mm[0]
    iv = sch.get(b).iter_vars
    if len(iv) < 3 or iv[-1].iter_type != tirx.IterVar.CommReduce \
            or any(v.iter_type != tirx.IterVar.DataPar for v in iv[:-1]):
        return None
    *sp, k = sch.get_loops(b)
    if len(sp) != len(iv) - 1:
        return None
    n_cols = _static(sch.get(sp[-1]).extent)
    if n_cols is not None and n_cols % lanes:
        return None
    epilogues = [c for c in blocks if not c.same_as(b)]
    outer, i, j = sp[:-2], sp[-2], sp[-1]
    tile = 2 * lanes if n_cols is not None and n_cols % (2 * lanes) == 0 else lanes  # symbolic: predicated
    io, ii = sch.split(i, [None, rows])
    jo, ji = sch.split(j, [None, tile])
    n_k = _static(sch.get(k).extent)
    if n_k is not None and n_k % kstep == 0 and kstep > 1:
        ko, ki = sch.split(k, [None, kstep])
        sch.reorder(*outer, io, jo, ko, ii, ki, ji)
        sch.unroll(ki)
    else:
        ko = k
        sch.reorder(*outer, io, jo, ko, ii, ji)
    tile_loop = sch.fuse(*outer, io, jo)
    sch.parallel(tile_loop)
    sch.vectorize(ji)
    init = sch.decompose_reduction(b, ko)
    sch.vectorize(sch.get_loops(init)[-1])
    for e in epilogues:
        try:
            sch.reverse_compute_at(e, tile_loop)
            sch.vectorize(sch.get_loops(e)[-1])
        except tvm.s_tir.schedule.ScheduleError:
            pass  # not a consumer of the tile (e.g. a reduction over another axis): left as it is
    return sch.mod["main"].with_attr(ATTR, True)


@tvm.transform.module_pass(opt_level=0, name="xpuc.ScheduleCPUMatmul")
class ScheduleCPUMatmul:
    """Apply :func:`schedule_matmul` to every PrimFunc of the module it fits (see the module docstring).

    Parameters
    ----------
    rows:
        Output rows per register tile.
    lanes:
        SIMD width in fp32 elements (16 = AVX-512, 4 = one NEON register; the tile is two vectors wide).
    kstep:
        Unrolled reduction steps.
    """

    def __init__(self, rows: int = 8, lanes: int = 16, kstep: int = 4) -> None:
        self.rows, self.lanes, self.kstep = rows, lanes, kstep

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        updates = {}
        for gv, func in mod.functions.items():
            if not isinstance(func, tirx.PrimFunc) or (func.attrs and ATTR in func.attrs) or _has_parallel(func):
                continue
            new = schedule_matmul(func, self.rows, self.lanes, self.kstep)
            if new is not None:
                updates[gv] = new
        if not updates:
            return mod
        mod = mod.clone()  # the caller's module stays as it was
        for gv, func in updates.items():
            mod[gv] = func
        return mod
