"""ApplyGPUSchedules: schedule every unscheduled TIR function of a module with dlight's GPU rules."""

from __future__ import annotations

import tvm
from tvm.s_tir import dlight as dl


@tvm.transform.module_pass(opt_level=0, name="xpuc.ApplyGPUSchedules")
class ApplyGPUSchedules:
    """Apply dlight's GPU rules (Matmul, GEMV, Reduction, GeneralReduction, Fallback) under ``target``.

    Parameters
    ----------
    target:
        A GPU target (``opencl``, ``cuda``, ``vulkan``, ``metal``). The Adreno default pipeline of TVM
        has no matmul/GEMV rules, so this pass is what makes prefill kernels use the GPU's threads.

    Notes
    -----
    Functions marked ``tirx.is_scheduled`` (TVM's paged-KV kernels, xpuc's hand-written ones) are left untouched by
    dlight; the ones it schedules get that mark.
    """

    def __init__(self, target: tvm.target.Target) -> None:
        self.target = target

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        rules = dl.ApplyDefaultSchedule(dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(),
                                        dl.gpu.GeneralReduction(), dl.gpu.Fallback())
        with self.target:
            return rules(mod.clone())  # dlight updates the module it is given; the caller's stays as it was
