"""Every kernel of SmolLM2's prefill graph, scheduled for Adreno OpenCL by dlight, executed on pocl
(a CPU OpenCL implementation) with the launch sizes of the lowered TIR, against the same PrimFunc
built for the host. The paged-KV attention kernels are TVM's own and are not part of this check."""

from __future__ import annotations

import os

import numpy as np
import pytest
import tvm

from xpuc.runtime.formats.arch import ArchConfig

pytestmark = pytest.mark.gpu

SMOLLM2 = ArchConfig("llama", 49152, 576, 1536, 30, 9, 3, 64, 1e5, 1e-5, "swiglu", True, False, 8192)


@pytest.fixture(scope="module")
def ctx():
    from support.opencl_check import POCL_ICD, opencl_context

    from xpuc.runtime.errors import XpucError

    if not os.path.exists(POCL_ICD):
        if os.environ.get("CI"):
            pytest.fail("CI must install pocl-opencl-icd (.ci/system-deps)")
        pytest.skip("pocl-opencl-icd not installed")
    try:
        return opencl_context()
    except XpucError as e:
        if os.environ.get("CI"):
            raise
        pytest.skip(str(e))


def test_prefill_kernels_on_pocl(ctx):
    from support.opencl_check import check_primfunc, prefill_kernels

    target = tvm.target.Target({"kind": "opencl", "device": "adreno"}, host={"kind": "llvm"})
    host = tvm.target.Target({"kind": "llvm"})
    scheduled, reference, shape_vars = prefill_kernels(SMOLLM2, target)
    rng = np.random.default_rng(0)
    checked = []
    for gv, func in scheduled.functions.items():
        if not isinstance(func, tvm.tirx.PrimFunc):
            continue
        r = check_primfunc(gv.name_hint, func, reference[gv.name_hint], target, host,
                           {v: 16 for v in shape_vars[gv.name_hint]}, ctx, rng)
        assert r.wrote, f"{r.name}: no buffer changed"
        assert r.max_rel_error < 1e-5, f"{r.name}: {r.max_rel_error}"
        checked.append(r)
    names = {r.name.rstrip("0123456789") for r in checked}
    assert {"matmul", "rms_norm", "silu", "multiply", "take", "add", "split"} <= names
    assert sum(r.kernels for r in checked) >= 30


def test_fp16_rewrite():
    from support.opencl_check import without_fp16_arithmetic

    src = ("#ifdef cl_khr_fp16\n#pragma x\n#endif\n__kernel void k(__global half* restrict a, "
           "__global half* restrict b, __global float* restrict c) {\n  a[(i + 1)] = b[j[2]];\n"
           "  c[0] = (convert_float(b[3]));\n  a[0] = (convert_half(c[1]));\n}\n")
    out = without_fp16_arithmetic(src)
    assert "vstore_half(vload_half(j[2], b), (i + 1), a);" in out
    assert "convert_float(vload_half(3, b))" in out
    assert "vstore_half((c[1]), 0, a);" in out
    assert "cl_khr_fp16" not in out
