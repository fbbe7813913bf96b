"""ScheduleCPUMatmul: a default CPU schedule for the matmuls TVM's legalization leaves as naive loops.

TVM 0.27's CPU pipeline schedules nothing and dlight has no CPU matmul rule, so an imported graph's
``matmul`` blocks (ONNX MatMul/Gemm, attention's batched matmuls, with fused epilogues such as a bias add or
SiLU) run as scalar loop nests. For every PrimFunc with a block named ``matmul`` whose iterators are
spatial except the last (the reduction) and this pass applies:

* padding (``pad_einsum``) of a symbolic column axis (attention's ``q @ k^T`` over the sequence), or of a
  static one that is not a multiple of the SIMD width (a convolution's pixels, a 6,625-class head), to a
  multiple of the tile width: the tiles vectorize without bounds checks, the padded copy of the right operand
  and the copy back carry them (symbolic or ragged rows keep one bounds check per row of a tile: padding them
  too was measured no faster, and packed-weight matmuls are not einsums ``pad_einsum`` accepts);
* a register tile of ``rows`` output rows x ``4 * lanes`` (else ``2 * lanes``, ``lanes``) columns, the rows
  as many as keep the accumulators in half the register file (:func:`tile_rows`), accumulated in a ``local``
  buffer (registers) and written back once per tile; the reduction split by
  ``kstep`` and unrolled, the rows and column vectors unrolled, the innermost ``lanes`` vectorized;
* parallel loop: the column panels when there are at least ``panels_per_thread`` per thread and no batch
  axes (each thread keeps its weight panel in cache while it walks all row tiles), else the fused batch,
  row-tile and column-tile loops; leading extent-1 axes are not fused in (they cost a modulo per tile);
* epilogue blocks (element-wise consumers fused by FuseTIR, the copy out of the padded tile) moved under
  the tile loop and vectorized, so they run on the tile while it is in cache; the padded input copies and
  any block that cannot move get a parallel row loop of their own (``parallel_rows``).

Functions that are already scheduled (marked ``tirx.is_scheduled``, as hand-written kernels are)
and matmuls that do not fit the pattern are left as they are.
"""

from __future__ import annotations

import tvm
from tvm import tirx
from tvm.s_tir import Schedule

from xpuc.compiler.passes.schedule_cpu_rows import (
    ATTR,
    parallel_rows,
    root_blocks,
    schedule_unscheduled,
    static_extent,
    strip_leading_units,
)

PAD_ROWS = False  # ragged/symbolic rows keep a bounds check per row tile (measured faster than padded copies)


def tile_rows(n_rows: int | None, vectors: int, lanes: int) -> int:
    """Rows of a register tile ``vectors`` SIMD registers wide: as many as keep the accumulators within half the
    register file (16 of AVX-512's / NEON's / HVX's 32 registers, 8 of AVX2's 16; at most 8 rows), the largest
    such count that divides ``n_rows`` (ragged rows cost a bounds check per row) unless that is under half of it.

    The 8-row x 4-vector tile used before held 32 accumulators, the whole AVX-512 register file: on the PP-OCRv4
    detector's 32 static matmuls, 4 rows took 12.2 ms against 14.3 (2 threads, AMD Zen 4; 24 x 864 x 9600: 3.15
    against 3.92 ms), on the recognizer's 7.97 against 8.06 ms.
    """
    budget = 8 if lanes == 8 else 16  # accumulators: AVX2 has 16 vector registers, the others 32
    most = max(1, min(8, budget // max(1, vectors)))
    if n_rows is None:
        return most
    best = max(r for r in range(1, most + 1) if n_rows % r == 0)
    return best if 2 * best >= most else most


def schedule_matmul(func: tirx.PrimFunc, rows: int | None = None, lanes: int = 16, kstep: int = 4,
                    panels_per_thread: int = 4, threads: int = 2) -> tirx.PrimFunc | None:
    """The scheduled function, or None when ``func`` has no matmul block of the supported form; ``rows`` of the
    register tile (default: :func:`tile_rows`)."""
    sch = Schedule(func)
    blocks = root_blocks(sch)
    mm = [b for b in blocks if sch.get(b).name_hint == "matmul"]
    if len(mm) != 1:
        return None
    b = mm[0]
    iv = sch.get(b).iter_vars
    if len(iv) < 3 or iv[-1].iter_type != tirx.IterVar.CommReduce \
            or any(v.iter_type != tirx.IterVar.DataPar for v in iv[:-1]):
        return None
    if len(sch.get_loops(b)) != len(iv):
        return None
    n_rows = static_extent(iv[-3].dom.extent)
    n_cols = static_extent(iv[-2].dom.extent)
    ragged = n_cols is not None and n_cols % lanes != 0
    if ragged:
        tile = 4 * lanes if n_cols >= 4 * lanes else lanes
    else:
        tile = 4 * lanes if n_cols is not None and n_cols % (4 * lanes) == 0 else 2 * lanes \
            if n_cols is None or n_cols % (2 * lanes) == 0 else lanes
    rows = rows or tile_rows(n_rows, tile // lanes, lanes)
    pad_rows = rows if PAD_ROWS and (n_rows is None or n_rows % rows) else 1
    pad_cols = tile if n_cols is None or ragged else 1
    if pad_rows > 1 or pad_cols > 1:
        # symbolic columns (attention's ``q @ k^T``): the kernel computes a padded tile grid that vectorizes;
        # the copy back to the real output (and any epilogue) carries the bounds check instead
        try:
            sch.pad_einsum(b, [1] * (len(iv) - 3) + [pad_rows, pad_cols, 1])
        except tvm.s_tir.schedule.ScheduleError:
            return None  # not an einsum (e.g. a packed-weight matmul): symbolic columns cannot be tiled
    *sp, k = sch.get_loops(b)
    outer, i, j = strip_leading_units(sch, sp[:-2] + [sp[-2]])[:-1], sp[-2], sp[-1]
    io, ii = sch.split(i, [None, rows])
    jo, ji = sch.split(j, [None, tile])
    n_k = static_extent(sch.get(k).extent)
    ksplit = n_k is not None and n_k % kstep == 0 and kstep > 1
    ko, ki = sch.split(k, [None, kstep]) if ksplit else (k, None)
    n_panels = -(-n_cols // tile) if n_cols is not None else 0
    if not outer and n_panels >= panels_per_thread * threads:
        # column panels outermost and parallel: each thread keeps its weight panel in cache for all row tiles
        sch.reorder(jo, io, ko, ii, *([ki] if ki is not None else []), ji)
        sch.parallel(jo)
        tile_loop = io
    else:
        sch.reorder(*outer, io, jo, ko, ii, *([ki] if ki is not None else []), ji)
        tile_loop = sch.fuse(*outer, io, jo)
        sch.parallel(tile_loop)
    if ki is not None:
        sch.unroll(ki)
    acc = sch.cache_write(b, 0, "local")  # the rows x tile accumulators, kept in registers
    sch.reverse_compute_at(acc, tile_loop)
    sch.vectorize(sch.get_loops(acc)[-1])
    jv, jl = sch.split(ji, [None, lanes])
    sch.unroll(ii)
    sch.unroll(jv)
    sch.vectorize(jl)
    init = sch.decompose_reduction(b, ko)
    sch.vectorize(sch.get_loops(init)[-1])
    for blk in sch.get_child_blocks(sch.get_sblock("root")):
        name = sch.get(blk).name_hint
        if name in ("matmul", "matmul_init") or sch.get(blk).same_as(sch.get(acc)):
            continue
        if _is_input_pad(sch, blk, b):
            parallel_rows(sch, blk, lanes)  # the padded copy of an input, before the tiles run
            continue
        try:  # epilogue (or the copy out of the padded tile): on the tile while it is in cache
            sch.reverse_compute_at(blk, tile_loop)
            loops = sch.get_loops(blk)
            if static_extent(sch.get(loops[-1]).extent) is not None:
                sch.vectorize(loops[-1])
        except tvm.s_tir.schedule.ScheduleError:
            parallel_rows(sch, blk, lanes)  # not a consumer of the tile: its own parallel loop
    return sch.mod["main"].with_attr(ATTR, True)


def _is_input_pad(sch: Schedule, blk, matmul) -> bool:
    return any(sch.get(c).same_as(sch.get(matmul)) for c in sch.get_consumers(blk))


@tvm.transform.module_pass(opt_level=0, name="xpuc.ScheduleCPUMatmul")
class ScheduleCPUMatmul:
    """Apply :func:`schedule_matmul` to every PrimFunc of the module it fits (see the module docstring).

    Parameters
    ----------
    rows:
        Output rows per register tile (default: :func:`tile_rows`, from the register file and the row count).
    lanes:
        SIMD width in fp32 elements (16 = AVX-512, 4 = one NEON register; the tile is two vectors wide).
    kstep:
        Unrolled reduction steps.
    threads:
        Cores the kernels run on (column panels go outermost when there are enough per thread).
    """

    def __init__(self, rows: int | None = None, lanes: int = 16, kstep: int = 4, threads: int = 2) -> None:
        self.rows, self.lanes, self.kstep, self.threads = rows, lanes, kstep, threads

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        return schedule_unscheduled(
            mod, lambda func: schedule_matmul(func, self.rows, self.lanes, self.kstep, threads=self.threads))
