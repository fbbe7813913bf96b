"""ApplyGPUSchedules: Before/Expected in TVMScript, numerics on pocl's OpenCL CPU device, scheduled kernels kept."""

from __future__ import annotations

import os

import numpy as np
import pytest
import tvm
from tvm.script import ir as I
from tvm.script import tirx as T

from xpuc.compiler.passes.apply_gpu_schedules import ApplyGPUSchedules

TARGET = tvm.target.Target({"kind": "opencl", "device": "adreno"}, host={"kind": "llvm"})


@I.ir_module
class Before:
    @T.prim_func(private=True, s_tir=True)
    def add(x: T.Buffer((T.int64(1), T.int64(256)), "float32"), y: T.Buffer((T.int64(1), T.int64(256)), "float32"),
            out: T.Buffer((T.int64(1), T.int64(256)), "float32")):
        T.func_attr({"tirx.noalias": True})
        for i0, i1 in T.grid(T.int64(1), T.int64(256)):
            with T.sblock("add"):
                v0, v1 = T.axis.remap("SS", [i0, i1])
                T.reads(x[v0, v1], y[v0, v1])
                T.writes(out[v0, v1])
                out[v0, v1] = x[v0, v1] + y[v0, v1]


@I.ir_module
class Expected:
    @T.prim_func(private=True, s_tir=True)
    def add(x: T.Buffer((T.int64(1), T.int64(256)), "float32"), y: T.Buffer((T.int64(1), T.int64(256)), "float32"),
            out: T.Buffer((T.int64(1), T.int64(256)), "float32")):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        for ax0_fused_0 in T.thread_binding(T.int64(1), thread="blockIdx.x"):
            for ax0_fused_1 in T.thread_binding(T.int64(256), thread="threadIdx.x"):
                with T.sblock("add"):
                    v0 = T.axis.spatial(T.int64(256), ax0_fused_0 * T.int64(256) + ax0_fused_1)
                    T.reads(x[T.int64(0), v0], y[T.int64(0), v0])
                    T.writes(out[T.int64(0), v0])
                    out[T.int64(0), v0] = x[T.int64(0), v0] + y[T.int64(0), v0]


def test_structure():
    tvm.ir.assert_structural_equal(ApplyGPUSchedules(TARGET)(Before), Expected)


def test_the_callers_module_is_left_as_it_was():
    """dlight updates the module it is handed; the pass hands it a copy."""
    mod = tvm.IRModule({"add": Before["add"]})
    ApplyGPUSchedules(TARGET)(mod)
    assert mod["add"].same_as(Before["add"])


def test_already_scheduled_kernels_are_left_alone():
    marked = tvm.IRModule({"add": Before["add"].with_attr("tirx.is_scheduled", True)})
    tvm.ir.assert_structural_equal(ApplyGPUSchedules(TARGET)(marked), marked)


def test_numerics_on_pocl():
    """The scheduled kernel, compiled to OpenCL C and run on pocl's CPU device, equals the unscheduled one on the
    host (numpy-checked inputs)."""
    from support.opencl_check import POCL_ICD, check_primfunc, opencl_context

    if not os.path.exists(POCL_ICD):
        if os.environ.get("CI"):
            pytest.fail("CI must install pocl-opencl-icd (.ci/system-deps)")
        pytest.skip("pocl-opencl-icd not installed")
    after = ApplyGPUSchedules(TARGET)(Before)
    r = check_primfunc("add", after["add"], Before["add"], TARGET, tvm.target.Target({"kind": "llvm"}), {},
                       opencl_context(), np.random.default_rng(0))
    assert r.wrote and r.kernels == 1
    assert r.max_rel_error < 1e-6, r.max_rel_error
