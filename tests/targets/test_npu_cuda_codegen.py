"""Code generation that cannot execute here: Hexagon HVX (NPU vector units) and CUDA.

Hexagon: ELF32 QUALCOMM DSP6 shared object with HVX instructions; the same scheduled TIR built for the
host gives the unscheduled function's numbers. CUDA: the prefill kernels' CUDA C compiles to PTX with
nvcc (skipped with the reason when nvcc is absent)."""

from __future__ import annotations

import re
import shutil
import subprocess

import numpy as np
import pytest
import tvm
from tvm import relax

from xpuc.compiler.relax_model import export_model
from xpuc.runtime.formats.arch import ArchConfig

pytestmark = pytest.mark.gpu
SMOL_1L = ArchConfig("llama", 49152, 576, 1536, 1, 9, 3, 64, 1e5, 1e-5, "swiglu", True, False, 2048)


def _legal_prefill():
    mod, _ = export_model(SMOL_1L, tvm.target.Target({"kind": "llvm"}), kernels="generic", functions=("prefill",))
    return relax.transform.LegalizeOps()(mod)


def test_hexagon_hvx_library(tmp_path):
    if not (shutil.which("ld.lld") and shutil.which("llvm-objdump")):
        pytest.skip("ld.lld / llvm-objdump not installed")
    from xpuc.targets.hexagon import build_hexagon, hvx_schedule

    legal = _legal_prefill()
    funcs = {gv.name_hint: f for gv, f in legal.functions.items()
             if isinstance(f, tvm.tirx.PrimFunc) and gv.name_hint.startswith(("matmul", "multiply", "add", "cast"))}
    sched = {n: hvx_schedule(f) for n, f in funcs.items()}
    assert sum("T.vectorized" in f.script() for f in sched.values()) >= 5
    so = build_hexagon(sched, "v75", tmp_path / "npu.so")
    header = subprocess.run(["llvm-readelf", "-h", str(so)], capture_output=True, text=True).stdout
    assert "ELF32" in header and "Hexagon" in header
    asm = subprocess.run(["llvm-objdump", "-d", "--mattr=+hvxv75,+hvx-length128b", str(so)],
                         capture_output=True, text=True).stdout
    assert len(re.findall(r"\bv\d+(:\d+)?(\.\w+)?\s*=\s*vmem", asm)) > 20  # HVX vector loads
    # host semantics of the HVX-scheduled functions
    host = tvm.target.Target({"kind": "llvm"})
    rng = np.random.default_rng(0)
    for name in ("multiply", "add"):
        if name not in sched:
            continue
        a = tvm.compile(tvm.IRModule({"main": sched[name].with_attr("global_symbol", "main")}), target=host)
        b = tvm.compile(tvm.IRModule({"main": funcs[name].with_attr("global_symbol", "main")}), target=host)
        shapes = [[16 if not isinstance(d, tvm.tirx.IntImm) and not str(d).isdigit() else int(d) for d in p.shape]
                  for p in funcs[name].params]
        ins = [rng.standard_normal(s).astype("float32") for s in shapes]
        ta, tb = [tvm.runtime.tensor(x) for x in ins], [tvm.runtime.tensor(x) for x in ins]
        a["main"](*ta)
        b["main"](*tb)
        np.testing.assert_allclose(ta[-1].numpy(), tb[-1].numpy(), rtol=1e-6)


def test_cuda_prefill_kernels_compile_to_ptx():
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc not installed")
    from tvm.support import nvcc

    from xpuc.compiler.pipeline import build

    target = tvm.target.Target({"kind": "cuda", "arch": "sm_80"}, host={"kind": "llvm"})
    mod, _ = export_model(SMOL_1L, target, kernels="generic", functions=("prefill",))
    ex = build(mod, target)
    dev_mod = ex.mod.imports[0].imports[0]  # VM executable -> host (llvm) -> device (cuda)
    assert dev_mod.kind == "cuda"
    src = dev_mod.inspect_source("cuda")
    kernels = set(re.findall(r"__global__ void (?:__launch_bounds__\(\d+\) )?(\w+)\(", src))
    assert len(kernels) >= 10
    with target:
        ptx = nvcc.compile_cuda(src, target_format="ptx", arch="sm_80", compiler="nvcc")
    ptx = ptx.decode() if isinstance(ptx, (bytes, bytearray)) else str(ptx)
    entries = set(re.findall(r"\.entry (\w+)\(", ptx if isinstance(ptx, str) else ptx.decode()))
    assert kernels <= entries
    assert "fma.rn.f32" in ptx or "fma.rn.ftz.f32" in ptx


def test_cuda_cases_for_the_gpu_machine(tmp_path):
    """The exported half of the CUDA execution check (``tests/support/cuda_run.py`` runs it where a GPU is)."""
    import importlib.util
    import json
    from pathlib import Path

    from support.cuda_check import case_inputs, export_prefill

    cases = export_prefill(tmp_path, seq=5)
    meta = json.loads((tmp_path / "cases.json").read_text())
    assert meta["seq"] == 5 and len(meta["cases"]) == len(cases) >= 30
    assert sum(len(c["launches"]) for c in cases) >= 31
    for c in cases:
        src = (tmp_path / c["source"]).read_text()
        for k in c["launches"]:
            assert "void __launch_bounds__" in src or "__global__" in src
            assert k["name"] in src and all(g >= 1 for g in k["grid"]) and all(b >= 1 for b in k["block"])
            assert max(k["block"]) > 1 or max(k["grid"]) > 1  # really spread over the GPU
        wants = np.load(tmp_path / c["arrays"])
        assert wants.files, f"{c['name']}: the host run changed no buffer"
        regenerated = case_inputs(c["inputs"], c["seed"], c["int_high"])
        assert {k: float(np.sum(a, dtype=np.float64)) for k, a in regenerated.items()} == c["input_sums"]
    # the GPU side's copy of the input generator (it runs without xpuc) gives the same arrays
    spec = importlib.util.spec_from_file_location("cuda_run", Path(__file__).parents[1] / "support" / "cuda_run.py")
    run = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run)
    c = cases[0]
    theirs = run.case_inputs(c["inputs"], c["seed"], c["int_high"])
    for k, a in case_inputs(c["inputs"], c["seed"], c["int_high"]).items():
        np.testing.assert_array_equal(theirs[k], a)
