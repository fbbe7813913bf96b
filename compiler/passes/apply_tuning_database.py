"""ApplyTuningDatabase: replace kernels by their best tuned schedule from a tuning database.

For every PrimFunc that is not scheduled yet (no ``xpuc.scheduled`` / ``tir.is_scheduled`` mark), the
function is looked up in a meta_schedule database under the workload name ``main`` — the normal form in
which ``xpuc tune`` extracted it — and, when a record exists for the target, the record's trace is
replayed on it (``Database.query_schedule``). The result keeps the function's own attributes (its
global symbol, op pattern) and is marked ``xpuc.scheduled`` and ``tir.is_scheduled`` so that later
schedule phases leave it alone. Kernels without a record are left for the default schedule phase, and so
are the kernels listed in ``keep_default`` (workload hashes whose default schedule measured faster than
every record when they were tuned): a database never makes a kernel slower than xpuc's own schedule.

The pass counts what it did in ``covered`` / ``candidates`` / ``kept_default`` (read after running it; the
CLI reports them).
"""

from __future__ import annotations

import tvm
from tvm import tirx

SCHEDULED = ("xpuc.scheduled", "tir.is_scheduled")


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
        Structural hashes (``xpuc.compiler.tuning.tuning_db.workload_hash``) of workloads left to the default
        schedule although the database has records for them.
    """

    def __init__(self, database, target: tvm.target.Target, keep_default: frozenset[str] = frozenset()) -> None:
        self.database = database
        self.target = target
        self.keep_default = frozenset(keep_default)
        self.covered = 0
        self.candidates = 0
        self.kept_default = 0

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        from xpuc.compiler.tuning.tuning_db import workload_hash

        updates = {}
        self.covered = self.candidates = self.kept_default = 0
        for gv, func in mod.functions.items():
            if not isinstance(func, tirx.PrimFunc):
                continue
            attrs = func.attrs or {}
            if any(k in attrs for k in SCHEDULED) or has_symbolic_shape(func):
                continue
            self.candidates += 1
            normal = tvm.IRModule({"main": func.with_attr("global_symbol", "main")})
            if self.keep_default and workload_hash(normal) in self.keep_default:
                self.kept_default += 1
                continue
            sch = self.database.query_schedule(normal, self.target, "main")
            if sch is None:
                continue
            new = sch.mod["main"]
            if "global_symbol" not in attrs:  # a private kernel stays private
                new = new.without_attr("global_symbol")
            for k, v in dict(attrs.items()).items():
                new = new.with_attr(k, v)
            updates[gv] = new.with_attr("xpuc.scheduled", True).with_attr("tir.is_scheduled", True)
        if not updates:
            return mod
        mod = mod.clone()  # the caller's module stays as it was
        for gv, func in updates.items():
            mod[gv] = func
        self.covered = len(updates)
        return mod
