"""The phased lowering of xpuc's Relax modules, in order; ``--debug-dump DIR`` writes the IR after each.

Phases (per target kind):

==========  ===========================================  ==========================================
phase       cpu                                          gpu
==========  ===========================================  ==========================================
dispatch    DispatchSampling, DispatchSortScan           (none)
attention   ReplaceCPUAttention (the paged KV cache's    (none)
            kernels: parallel, vectorized)
specialize  SpecializeSequenceBuckets (only with         same
            tuning buckets: static copies of ``main``)
conv        ConvToMatmul (dense NCHW conv2d with   (none)
            constant weights -> im2col + matmul)
fastmath    FastMathTransform (softmax, exp, tanh, erf   (none)
            with polynomial approximations that
            vectorize; max rel. error ~1e-7)
pack        PackMatmulWeights (constant weights stored   (none)
            panel-major for the matmul schedule)
legalize    LegalizeOps (high-level ops -> TIR)          same
annotate    AnnotateTIROpPattern                         same
fuse        FoldConstant, FuseOps, FuseTIR               (inside the build)
tune        ApplyTuningDatabase (only with a database:   (none)
            best tuned schedule of each covered kernel)
schedule    ScheduleCPUMatmul (matmuls left naive by     ApplyGPUSchedules (dlight GPU rules)
            legalization: register tiles, padding of
            symbolic columns), ScheduleCPUDepthwise
            (grouped convolutions per channel, rows
            vectorized, epilogue fused), then
            ScheduleCPURows (every other kernel in
            parallel rows); hand-written kernels kept
build       tvm.compile: memory planning, VM lowering    same, plus device codegen (OpenCL / CUDA)
==========  ===========================================  ==========================================

An ONNX graph's lowered module then gets ``LiftConstants`` (``compile_onnx``; ``--debug-dump`` writes
``99_lift.py``): its constant tensors become parameters stored beside the library.

The NPU (Hexagon HVX) gets the CPU phases with 32-lane (128-byte) vectors and the DSP's 4 hardware
threads; its build runs VM lowering and codegen with Hexagon as the host (``targets/hexagon.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import tvm
from tvm import relax

from xpuc.compiler.passes.apply_gpu_schedules import ApplyGPUSchedules
from xpuc.compiler.passes.conv_to_matmul import ConvToMatmul
from xpuc.compiler.passes.cpu_attention import ReplaceCPUAttention
from xpuc.compiler.passes.pack_matmul_weights import PackMatmulWeights
from xpuc.compiler.passes.schedule_cpu_depthwise import ScheduleCPUDepthwise
from xpuc.compiler.passes.schedule_cpu_matmul import ScheduleCPUMatmul
from xpuc.compiler.passes.schedule_cpu_rows import ScheduleCPURows
from xpuc.compiler.passes.specialize_buckets import SpecializeSequenceBuckets

#: Version of the CPU default schedule (fastmath + packed weights + ScheduleCPUMatmul + ScheduleCPUDepthwise +
#: ScheduleCPURows). A tuning database records it next to each default latency it measured; a change makes those
#: latencies stale.
DEFAULT_CPU_SCHEDULE = "6"


def default_cpu_schedule(target: tvm.target.Target) -> tvm.transform.Pass:
    """The schedule phase of CPU targets (what a kernel gets without a tuning database)."""
    return tvm.transform.Sequential([
        ScheduleCPUMatmul(lanes=simd_lanes(target), threads=int(target.attrs.get("num-cores", 1) or 1)),
        ScheduleCPUDepthwise(lanes=simd_lanes(target)),
        ScheduleCPURows(lanes=simd_lanes(target))])


def simd_lanes(target: tvm.target.Target) -> int:
    """fp32 lanes of the target's widest SIMD registers (32 HVX-128B, 16 AVX-512, 8 AVX2, 4 NEON/SSE)."""
    attrs = " ".join(str(a) for a in (target.attrs.get("mattr") or []))
    if target.kind.name == "hexagon":
        return 32 if "+hvx-length128b" in attrs else 16
    mcpu = str(target.attrs.get("mcpu", ""))
    triple = str(target.attrs.get("mtriple", ""))
    if triple.startswith("aarch64") or triple.startswith("arm"):
        return 4
    if "+avx512f" in attrs or any(k in mcpu for k in ("skylake-avx512", "icelake", "sapphirerapids", "znver4",
                                                      "cascadelake", "cooperlake", "emeraldrapids", "tigerlake")):
        return 16
    return 8


def phases(target: tvm.target.Target, buckets: tuple[int, ...] = (),
           tuning=None) -> list[tuple[str, Callable[[tvm.IRModule], tvm.IRModule]]]:
    """The (name, pass) list for ``target`` (GPU kinds get the dlight schedule phase).

    ``buckets`` adds static-length copies of ``main``; ``tuning`` (an ``ApplyTuningDatabase`` pass) applies
    tuned schedules before the default schedule phase (CPU targets).
    """
    special = [("specialize", SpecializeSequenceBuckets(buckets))] if buckets else []
    if is_gpu(target):
        return [*special, ("legalize", relax.transform.LegalizeOps()),
                ("annotate", relax.transform.AnnotateTIROpPattern()),
                ("schedule", ApplyGPUSchedules(target))]
    return [
        ("dispatch", tvm.transform.Sequential([relax.backend.DispatchSampling(), relax.backend.DispatchSortScan()])),
        ("attention", ReplaceCPUAttention()),
        *special,  # before packing: each static copy gets kernels of its own shapes
        ("conv", ConvToMatmul()),
        ("fastmath", relax.transform.FastMathTransform()),
        ("pack", PackMatmulWeights(panel=4 * simd_lanes(target))),
        ("legalize", relax.transform.LegalizeOps()),
        ("annotate", relax.transform.AnnotateTIROpPattern()),
        ("fuse", tvm.transform.Sequential([relax.transform.FoldConstant(), relax.transform.FuseOps(),
                                           relax.transform.FuseTIR()])),
        *([("tune", tuning)] if tuning is not None else []),
        ("schedule", default_cpu_schedule(target)),
    ]


def is_gpu(target: tvm.target.Target) -> bool:
    return target.kind.name in ("opencl", "cuda", "vulkan", "metal", "rocm")


def lower(mod: tvm.IRModule, target: tvm.target.Target, debug_dump: Path | None = None,
          tag: str = "module", buckets: tuple[int, ...] = (), tuning=None) -> tvm.IRModule:
    """Run the phases; with ``debug_dump`` write ``DIR/<tag>/<NN>_<phase>.py`` (TVMScript) after each."""
    if debug_dump is not None:
        out = Path(debug_dump) / tag
        out.mkdir(parents=True, exist_ok=True)
        (out / "00_input.py").write_text(mod.script())
    for i, (name, fn) in enumerate(phases(target, buckets, tuning), start=1):
        mod = fn(mod)
        if debug_dump is not None:
            (out / f"{i:02d}_{name}.py").write_text(mod.script())
    return mod


def build(mod: tvm.IRModule, target: tvm.target.Target, debug_dump: Path | None = None, tag: str = "module",
          buckets: tuple[int, ...] = (), tuning=None):
    """``lower`` then :func:`compile_lowered`; returns the executable."""
    return compile_lowered(lower(mod, target, debug_dump, tag, buckets, tuning), target)


def compile_lowered(mod: tvm.IRModule, target: tvm.target.Target):
    """``tvm.compile`` of a module that went through :func:`lower` (Hexagon: ``build_relax_hexagon``)."""
    if target.kind.name == "hexagon":
        from xpuc.targets.hexagon import build_relax_hexagon

        return build_relax_hexagon(mod, target)
    with target:
        # TVM's per-device default pipelines legalize and fuse again (Adreno's also constant-folds by running
        # kernels on the host); the module is already lowered and scheduled, so it gets the VM lowering only.
        return tvm.compile(mod, target=target, relax_pipeline=relax.pipeline.default_build_pipeline())
