"""ScheduleCPURows: run the kernels that are not matmuls (softmax, norms, RoPE, element-wise) in parallel rows.

After legalization these kernels are serial scalar loop nests; at 512 tokens the attention softmax alone took
a third of the prefill time. For every unscheduled PrimFunc without a ``matmul`` block this pass

* fuses the leading spatial loops of the last (output) block into one *row* loop — every loop but the
  innermost, unit loops dropped;
* moves each producer block under the row loop (``compute_at``: a softmax row's max, exponentials and sum
  are computed next to the row that uses them, while it is in cache); producers that cannot move, and all
  blocks of a kernel that selects between inputs (``if_then_else``: concatenate, whose legalized read
  regions are incomplete), get a parallel row loop of their own;
* runs the row loop in parallel and vectorizes each block's innermost loop where it is spatial, static and a
  multiple of the SIMD width (split into vectors of ``lanes``).

Kernels already scheduled (marked ``tirx.is_scheduled``, as hand-written kernels are) are left as they are.
"""

from __future__ import annotations

import tvm
from tvm import tirx
from tvm.s_tir import Schedule

from xpuc.compiler.passes import IS_SCHEDULED

ATTR = IS_SCHEDULED


def static_extent(extent) -> int | None:
    return int(extent) if isinstance(extent, (int, tirx.IntImm)) else None


def is_unit(sch: Schedule, loop) -> bool:
    return static_extent(sch.get(loop).extent) == 1


def _spatial_lead(sch: Schedule, blk) -> tuple[list, object | None] | None:
    """(leading spatial loops but the innermost, innermost spatial loop or None); None if loops != iterators."""
    loops = sch.get_loops(blk)
    iters = sch.get(blk).iter_vars
    if not loops or len(loops) != len(iters):
        return None
    lead = []
    for lp, v in zip(loops, iters, strict=True):
        if v.iter_type != tirx.IterVar.DataPar:
            break
        lead.append(lp)
    inner = lead.pop() if len(lead) == len(loops) else None
    return strip_leading_units(sch, lead), inner


def strip_leading_units(sch: Schedule, loops: list) -> list:
    """``loops`` without its leading extent-1 loops (fusing them in costs a modulo per iteration); one stays."""
    k = 0
    while k < len(loops) - 1 and is_unit(sch, loops[k]):
        k += 1
    return loops[k:]


def _vectorize_inner(sch: Schedule, loop, lanes: int) -> None:
    n = static_extent(sch.get(loop).extent)
    if n is None or n % lanes or len(sch.get_child_blocks(loop)) != 1:  # only a loop around one block
        return
    try:
        if n == lanes:
            sch.vectorize(loop)
        else:
            sch.vectorize(sch.split(loop, [None, lanes])[1])
    except tvm.s_tir.schedule.ScheduleError:
        pass  # a reduction (or otherwise not data-parallel) innermost loop stays scalar


def root_blocks(sch: Schedule) -> list:
    """The blocks under the function's root block; none for a kernel written as plain statements (TOPI's
    scatter kernels are) or one with an empty loop (a slice that selects nothing): nothing to schedule."""
    try:
        blocks = sch.get_child_blocks(sch.get_sblock("root"))
    except tvm.s_tir.schedule.ScheduleError:
        return []
    for b in blocks:
        if any(static_extent(sch.get(lp).extent) == 0 for lp in sch.get_loops(b)):
            return []
    return list(blocks)


def parallel_rows(sch: Schedule, blk, lanes: int) -> bool:
    """Run one block's leading spatial loops fused in parallel and vectorize its innermost spatial loop.

    Returns False (schedule unchanged) when the block's loops do not map one to one onto its iterators.
    """
    found = _spatial_lead(sch, blk)
    if found is None or not found[0]:
        return False
    lead, inner = found
    try:
        sch.parallel(sch.fuse(*lead) if len(lead) > 1 else lead[0])
    except tvm.s_tir.schedule.ScheduleError:
        return False
    if inner is not None:
        _vectorize_inner(sch, inner, lanes)
    return True


def schedule_rows(func: tirx.PrimFunc, lanes: int = 16) -> tirx.PrimFunc | None:
    """The scheduled function, or None when nothing applies (no blocks, a matmul, loops not one per iterator)."""
    sch = Schedule(func)
    blocks = root_blocks(sch)
    if not blocks or any(sch.get(b).name_hint == "matmul" for b in blocks):
        return None
    out = blocks[-1]
    found = _spatial_lead(sch, out)
    if found is None:
        return None
    lead, inner = found
    if not lead:  # one loop only: rows of ``lanes`` * 16 elements
        if inner is None or static_extent(sch.get(inner).extent) in (None, 1):
            return None
        lead_loop, inner = sch.split(inner, [None, 16 * lanes])
        lead = [lead_loop]
    row = sch.fuse(*lead) if len(lead) > 1 else lead[0]
    moved = []
    # a block that selects between inputs (concatenate, pad) declares only part of what it reads; moving its
    # producers under the row loop would trust that declaration, so such kernels get a parallel loop per block
    trusted = "if_then_else" not in func.script()
    for blk in reversed(blocks[:-1]) if trusted else []:
        try:
            sch.compute_at(blk, row)
            moved.append(blk)
        except tvm.s_tir.schedule.ScheduleError:
            pass
    try:
        sch.parallel(row)
    except tvm.s_tir.schedule.ScheduleError:
        return None
    if inner is not None:
        _vectorize_inner(sch, inner, lanes)
    for blk in moved:
        if all(v.iter_type == tirx.IterVar.DataPar for v in sch.get(blk).iter_vars):  # reductions stay scalar
            _vectorize_inner(sch, sch.get_loops(blk)[-1], lanes)
    for blk in blocks[:-1]:
        if not any(sch.get(blk).same_as(sch.get(m)) for m in moved):
            parallel_rows(sch, blk, lanes)
    return sch.mod["main"].with_attr(ATTR, True)


def schedule_unscheduled(mod: tvm.IRModule, schedule) -> tvm.IRModule:
    """``mod`` with ``schedule(func)`` (a PrimFunc or None) applied to every PrimFunc not scheduled yet
    (no ``tirx.is_scheduled`` mark: hand-written kernels and scheduled ones carry it); the input module is left as
    it was."""
    updates = {}
    for gv, func in mod.functions.items():
        if not isinstance(func, tirx.PrimFunc) or (func.attrs and ATTR in func.attrs):
            continue
        new = schedule(func)
        if new is not None:
            updates[gv] = new
    if not updates:
        return mod
    mod = mod.clone()
    for gv, func in updates.items():
        mod[gv] = func
    return mod


@tvm.transform.module_pass(opt_level=0, name="xpuc.ScheduleCPURows")
class ScheduleCPURows:
    """Apply :func:`schedule_rows` to every unscheduled PrimFunc of the module (see the module docstring).

    Parameters
    ----------
    lanes:
        SIMD width in fp32 elements (16 = AVX-512, 4 = NEON).
    """

    def __init__(self, lanes: int = 16) -> None:
        self.lanes = lanes

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        return schedule_unscheduled(mod, lambda func: schedule_rows(func, self.lanes))
