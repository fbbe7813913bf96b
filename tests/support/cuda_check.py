"""Execute the CUDA kernels TVM generates on an NVIDIA GPU and compare them with the host CPU's results.

The machine with the GPU need not have TVM, so the check has two halves:

* :func:`export_case` (here, with TVM): for one GPU-scheduled PrimFunc, its CUDA C source, every kernel's
  grid and block sizes read from the thread-bound loops of the TIR (as :mod:`support.opencl_check`
  does for OpenCL), random inputs (a seed and their sums: the GPU side regenerates them), and the results
  of the *unscheduled* PrimFunc built for the host CPU on those inputs (the buffers it changed); written
  into a case directory (``cases.json``, one ``.cu`` and one ``.npz`` per function).
* ``tests/support/cuda_run.py`` (there, numpy and CuPy only): compiles each source with NVRTC, launches the kernels
  in order with the recorded sizes on the inputs, and compares every buffer with the host's results.

``cd tests && python -m support.cuda_check OUT_DIR`` exports SmolLM2's prefill kernels (one layer, small vocabulary
so that the case directory stays small) for ``sm_90``.
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np

from support.cuda_run import case_inputs
from support.opencl_check import _bound_analyzer, _buffers_of, launches, prefill_kernels

CUDA_SIG = re.compile(r'extern\s+"C"\s+__global__\s+void\s+(?:__launch_bounds__\(\d+\)\s+)?(\w+)\s*\(([^)]*)\)',
                      re.S)
CASES = "cases.json"


def export_case(name: str, scheduled, unscheduled, gpu_target, host_target, bind: dict, out_dir: Path,
                rng: np.random.Generator, int_high: int = 16) -> dict:
    """Write ``name``'s CUDA source, inputs and host results into ``out_dir``; returns the case record."""
    import tvm

    analyzer = _bound_analyzer(bind)

    def shape(buf):
        return [int(analyzer.simplify(d)) for d in buf.shape]

    # without CSE the kernels' scalar arguments are the function's own shape variables, which are bound here
    with gpu_target, tvm.transform.PassContext(config={"tirx.disable_cse_tir": True}):
        lib = tvm.compile(tvm.IRModule({name: scheduled.with_attr("global_symbol", name)}), target=gpu_target)
    mod = lib.mod if hasattr(lib, "mod") else lib
    source = mod.imports[0].inspect_source()
    kl = launches(scheduled, source, name, bind, CUDA_SIG)
    params, scratch = _buffers_of(scheduled)
    counts: dict[str, int] = {}
    keys = []
    for b in params:  # outputs of multi-output ops share one name: one kernel per output, in order
        dup = sum(1 for q in params if q.name == b.name) > 1
        keys.append(f"{b.name}#{counts.get(b.name, 0)}" if dup else b.name)
        counts[b.name] = counts.get(b.name, 0) + 1
    specs = [{"key": k, "shape": shape(b), "dtype": str(b.dtype)} for b, k in zip(params, keys, strict=True)]
    seed = int(rng.integers(0, 2**31))
    inputs = case_inputs(specs, seed, int_high)
    hlib = tvm.compile(tvm.IRModule({name: unscheduled.with_attr("global_symbol", name)}), target=host_target)
    tensors = [tvm.runtime.tensor(inputs[k]) for k in keys]
    hlib[name](*tensors)
    # only what the function changed travels; the inputs are regenerated there from the seed (and checked)
    wants = {f"want:{k}": t.numpy() for k, t in zip(keys, tensors, strict=True)
             if not np.array_equal(t.numpy(), inputs[k])}
    (out_dir / f"{name}.cu").write_text(source)
    np.savez_compressed(out_dir / f"{name}.npz", **wants)
    return {"name": name, "source": f"{name}.cu", "arrays": f"{name}.npz", "keys": keys, "inputs": specs,
            "seed": seed, "int_high": int_high, "input_sums": {k: float(np.sum(a, dtype=np.float64))
                                                                for k, a in inputs.items()},
            "scratch": {b.name: {"shape": shape(b), "dtype": str(b.dtype)} for b in scratch},
            "scalars": {v.name: int(val) for v, val in bind.items()},
            "launches": [asdict(k) for k in kl]}


def export_prefill(out_dir: str | Path, seq: int = 16, arch: str = "sm_90") -> list[dict]:
    """Export every kernel of a SmolLM2-shaped prefill graph (1 layer, vocabulary 512) scheduled by dlight."""
    import tvm

    from xpuc.runtime.formats.arch import ArchConfig

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = ArchConfig("llama", 512, 576, 1536, 1, 9, 3, 64, 1e5, 1e-5, "swiglu", True, False, 2048)
    target = tvm.target.Target({"kind": "cuda", "arch": arch}, host={"kind": "llvm"})
    host = tvm.target.Target({"kind": "llvm"})
    scheduled, reference, shape_vars = prefill_kernels(cfg, target)
    rng = np.random.default_rng(0)
    cases = []
    for gv, func in scheduled.functions.items():
        if not isinstance(func, tvm.tirx.PrimFunc) or gv.name_hint not in reference:
            continue
        cases.append(export_case(gv.name_hint, func, reference[gv.name_hint], target, host,
                                 {v: seq for v in shape_vars[gv.name_hint]}, out, rng))
    (out / CASES).write_text(json.dumps({"arch": arch, "seq": seq, "cases": cases}, indent=1))
    return cases


if __name__ == "__main__":
    done = export_prefill(sys.argv[1] if len(sys.argv) > 1 else "cuda-cases")
    print(f"exported {len(done)} functions, {sum(len(c['launches']) for c in done)} kernels")
