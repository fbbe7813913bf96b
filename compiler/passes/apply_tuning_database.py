"""ApplyTuningDatabase: replace kernels by their best tuned schedule from a tuning database.

For every PrimFunc that is not scheduled yet (no ``tirx.is_scheduled`` mark), the
function is looked up in a meta_schedule database under the workload name ``main`` — the normal form in
which ``xpuc tune`` extracted it — and, when a record exists for the target, the record's trace is
replayed on it (``Database.query_schedule``). The result keeps the function's own attributes (its
global symbol, op pattern) and is marked ``tirx.is_scheduled`` so that later
schedule phases leave it alone. Kernels without a record are left for the default schedule phase, and so
are the kernels listed in ``keep_default`` (workload hashes whose default schedule measured faster than
every record when they were tuned): a database never makes a kernel slower than xpuc's own schedule.

The pass says what it did in the module it returns: the module attribute ``xpuc.tuning`` (:data:`REPORT`) holds
``tunable`` (kernels it could look up), ``from_database`` (replaced by a record) and ``kept_default``; the CLI
reports them from the lowered module.
"""

from __future__ import annotations

import tvm
from tvm import tirx

from xpuc.compiler.passes import IS_SCHEDULED

REPORT = "xpuc.tuning"  # module attribute: what the pass did



def workload_hash(mod: tvm.IRModule) -> str:
    """The key of a tuning workload: the structural hash of its normal form (one PrimFunc named ``main``)."""
    from tvm_ffi import structural_hash

    return f"{structural_hash(mod) & (2**64 - 1):016x}"


def has_symbolic_shape(func: tirx.PrimFunc) -> bool:
    """Does a buffer of ``func`` still have a symbolic extent? (Such kernels cannot be tuned statically.)"""
    text = func.script()
    return "T.int64()" in text or "T.int32()" in text


@tvm.transform.module_pass(opt_level=0, name="xpuc.ApplyTuningDatabase")
class ApplyTuningDatabase:
    """Apply the best records of ``database`` for ``target``.

    Parameters
    ----------
    database:
        A ``tvm.s_tir.meta_schedule.database.Database`` (e.g. ``TuningDatabase(dir).ms``).
    target:
        The target the module is compiled for; records tuned for another target do not match.
    keep_default:
        Structural hashes (:func:`workload_hash`) of workloads left to the default
        schedule although the database has records for them.
    """

    def __init__(self, database, target: tvm.target.Target, keep_default: frozenset[str] = frozenset()) -> None:
        self.database = database
        self.target = target
        self.keep_default = frozenset(keep_default)

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        updates = {}
        tunable = kept = 0
        for gv, func in mod.functions.items():
            if not isinstance(func, tirx.PrimFunc):
                continue
            attrs = func.attrs or {}
            if IS_SCHEDULED in attrs or has_symbolic_shape(func):
                continue
            tunable += 1
            normal = tvm.IRModule({"main": func.with_attr("global_symbol", "main")})
            if self.keep_default and workload_hash(normal) in self.keep_default:
                kept += 1
                continue
            sch = self.database.query_schedule(normal, self.target, "main")
            if sch is None:
                continue
            new = sch.mod["main"]
            if "global_symbol" not in attrs:  # a private kernel stays private
                new = new.without_attr("global_symbol")
            for k, v in dict(attrs.items()).items():
                new = new.with_attr(k, v)
            updates[gv] = new.with_attr(IS_SCHEDULED, True)
        mod = mod.clone()  # the caller's module stays as it was
        for gv, func in updates.items():
            mod[gv] = func
        return mod.with_attr(REPORT, {"tunable": tunable, "from_database": len(updates), "kept_default": kept})


def tuning_report(mod: tvm.IRModule) -> dict[str, int] | None:
    """What :class:`ApplyTuningDatabase` did to ``mod`` (or a module lowered from it); None if it did not run."""
    attrs = mod.attrs or {}
    if REPORT not in attrs:
        return None
    return {k: int(v) for k, v in attrs[REPORT].items()}
