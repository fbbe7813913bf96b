"""The phased lowering of xpuc's Relax modules, in order; ``--debug-dump DIR`` writes the IR after each.

Phases (per target kind):

==========  ===========================================  ==========================================
phase       cpu                                          gpu
==========  ===========================================  ==========================================
legalize    LegalizeOps (high-level ops -> TIR)          same
annotate    AnnotateTIROpPattern                         same
schedule    none: projections are hand-scheduled TIR     ApplyGPUSchedules (dlight GPU rules)
build       tvm.compile: memory planning, VM lowering    same, plus device codegen (OpenCL / CUDA)
==========  ===========================================  ==========================================
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import tvm
from tvm import relax

from xpuc.compiler.passes.apply_gpu_schedules import ApplyGPUSchedules


def phases(target: tvm.target.Target) -> list[tuple[str, Callable[[tvm.IRModule], tvm.IRModule]]]:
    """The (name, pass) list for ``target`` (GPU kinds get the dlight schedule phase)."""
    out: list[tuple[str, Callable]] = [
        ("legalize", relax.transform.LegalizeOps()),
        ("annotate", relax.transform.AnnotateTIROpPattern()),
    ]
    if is_gpu(target):
        out.append(("schedule", ApplyGPUSchedules(target)))
    return out


def is_gpu(target: tvm.target.Target) -> bool:
    return target.kind.name in ("opencl", "cuda", "vulkan", "metal", "rocm")


def lower(mod: tvm.IRModule, target: tvm.target.Target, debug_dump: Path | None = None,
          tag: str = "module") -> tvm.IRModule:
    """Run the phases; with ``debug_dump`` write ``DIR/<tag>/<NN>_<phase>.py`` (TVMScript) after each."""
    if debug_dump is not None:
        out = Path(debug_dump) / tag
        out.mkdir(parents=True, exist_ok=True)
        (out / "00_input.py").write_text(mod.script())
    for i, (name, fn) in enumerate(phases(target), start=1):
        mod = fn(mod)
        if debug_dump is not None:
            (out / f"{i:02d}_{name}.py").write_text(mod.script())
    return mod


def build(mod: tvm.IRModule, target: tvm.target.Target, debug_dump: Path | None = None, tag: str = "module"):
    """``lower`` then ``tvm.compile``; returns the executable."""
    mod = lower(mod, target, debug_dump, tag)
    with target:
        if is_gpu(target):
            # TVM's per-device default pipelines (Adreno's) constant-fold by running kernels on the host;
            # our module is already legalized and scheduled, so the generic VM lowering is what it needs.
            return tvm.compile(mod, target=target, relax_pipeline=relax.pipeline.default_build_pipeline())
        return tvm.compile(mod, target=target)
