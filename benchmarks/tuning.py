"""Tuned vs default schedule vs numpy on the dense prefill matmuls of SmolLM2 and of the 7B shape.

Usage: python benchmarks/tuning.py [--models smollm2,7b] [--tokens 128] [--trials 32]
                                   [--out benchmarks/results/tuning.json]

For each model the decoder-prefill graph (one layer; weights as graph inputs) is lowered at ``--tokens``
tokens and its matmul kernels (with their fused epilogues) are tuned by ``xpuc tune``'s driver
(meta_schedule evolutionary search + XGBoost cost model, ``--trials`` per kernel) into a database cached
under ``$XPUC_CACHE/bench-tuning`` (a rerun resumes or reuses it; the tuning wall time reported is that of
this run). Then, in this process and with the same thread count, each kernel is timed four ways:
the tuned schedule (the database applied by ``ApplyTuningDatabase``), xpuc's default schedule
(the CPU schedule phase, what ``xpuc compile`` uses without a database), the bare matmul with its weight
packed panel-major as ``PackMatmulWeights`` stores an ONNX graph's constant weights (default-scheduled, no
epilogue) and ``numpy.matmul`` (OpenBLAS) on the same shapes (no epilogue). Best of three interleaved rounds,
each a median of repeated runs.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from timing import median_time

MODELS = {
    "smollm2": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_heads=9, num_kv_heads=3,
                    head_dim=64),
    "7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_heads=32, num_kv_heads=8,
               head_dim=128),
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="smollm2,7b")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--trials", type=int, default=32)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default="benchmarks/results/tuning.json")
    args = ap.parse_args()

    from xpuc.runtime.threads import configure_tvm_threads

    threads = configure_tvm_threads(args.threads)
    import tvm
    from tvm.s_tir import meta_schedule as ms

    from xpuc.compiler.frontend_onnx import import_onnx
    from xpuc.compiler.passes.apply_tuning_database import ApplyTuningDatabase
    from xpuc.compiler.pipeline import default_cpu_schedule, simd_lanes
    from xpuc.compiler.tuning.tune import time_kernel, tune_workloads
    from xpuc.compiler.tuning.workloads import _decoder_graph, extract_workloads
    from xpuc.compiler.tuning_db import TuningDatabase
    from xpuc.runtime.artifact import cache_dir
    from xpuc.runtime.formats.arch import ArchConfig
    from xpuc.targets.profile import load_profile

    target = load_profile("host").cpu_target()
    schedule = default_cpu_schedule(target)
    panel = 4 * simd_lanes(target)
    rows = []
    for name in args.models.split(","):
        cfg = ArchConfig("llama", num_layers=1, rope_theta=1e4, rms_norm_eps=1e-5, ffn_kind="swiglu",
                         tie_embeddings=False, qkv_bias=False, context_length=4096, **MODELS[name])
        mod = import_onnx(_decoder_graph(cfg), f"{name} decoder")
        wls = [w for w in extract_workloads(mod, target, (args.tokens,)) if "matmul" in w.name
               and w.mod["main"].params and len(ms.arg_info.ArgInfo.from_prim_func(w.mod["main"])) >= 3
               and len(ms.arg_info.ArgInfo.from_prim_func(w.mod["main"])[1].shape) == 2]
        db = TuningDatabase(cache_dir() / "bench-tuning" / f"{name}-{args.tokens}", create=True, target=target)
        print(f"{name}: tuning {len(wls)} matmul kernels at {args.tokens} tokens, {args.trials} trials each",
              file=sys.stderr)
        t0 = time.perf_counter()
        report = tune_workloads(wls, target, db, args.trials, progress=True, measure_default=False)
        tune_s = time.perf_counter() - t0
        apply = ApplyTuningDatabase(db.ms, target)
        for wl in wls:
            func = wl.mod["main"]
            info = ms.arg_info.ArgInfo.from_prim_func(func)
            tuned = apply(tvm.IRModule({"k": func.without_attr("global_symbol")}))["k"]
            default = schedule(tvm.IRModule({"main": func}))["main"]
            lib_tuned = tvm.compile(tvm.IRModule({"main": tuned.with_attr("global_symbol", "main")}),
                                    target=target) if apply.covered else None
            lib_default = tvm.compile(tvm.IRModule({"main": default}), target=target)
            # what xpuc compiles for an ONNX graph, whose weights are constants: packed panel-major (no epilogue)
            packed_func = packed_kernel(info, panel, schedule)
            lib_packed = tvm.compile(tvm.IRModule({"main": packed_func}), target=target) if packed_func else None
            x = np.random.default_rng(0).standard_normal([int(s) for s in info[0].shape]).astype(np.float32)
            w = np.random.default_rng(1).standard_normal([int(s) for s in info[1].shape]).astype(np.float32)
            # interleaved rounds, the best round counts: the VM's steal time and the two thread pools
            # (TVM's, OpenBLAS's) disturb single measurements
            t_tuned = t_default = t_numpy = t_packed = float("inf")
            for _ in range(3):
                t_default = min(t_default, time_kernel(lib_default, func))
                if lib_tuned is not None:
                    t_tuned = min(t_tuned, time_kernel(lib_tuned, func))
                t_numpy = min(t_numpy, median_time(lambda x=x, w=w: np.matmul(x, w), repeats=5))
                if lib_packed is not None:
                    t_packed = min(t_packed, time_kernel(lib_packed, packed_func))
            t_tuned = None if lib_tuned is None else t_tuned
            res = next(r for r in report.results if r.key == wl.key)
            rows.append({"model": name, "kernel": wl.name, "tokens": args.tokens, "flop": wl.flop,
                         "shape_x": [int(s) for s in info[0].shape], "shape_w": [int(s) for s in info[1].shape],
                         "trials": res.trials_before + res.trials_new, "tuned_us": t_tuned and t_tuned * 1e6,
                         "default_us": t_default * 1e6, "numpy_us": t_numpy * 1e6,
                         "default_packed_us": t_packed * 1e6 if lib_packed is not None else None,
                         "tuned_vs_default": t_tuned and t_default / t_tuned,
                         "tuned_vs_numpy": t_tuned and t_numpy / t_tuned})
            r = rows[-1]
            print(f"{name:8s} {wl.name[:40]:40s} x{r['shape_x']} w{r['shape_w']}: tuned {_f(r['tuned_us'])} us, "
                  f"default {r['default_us']:.0f} us (packed weights {_f(r['default_packed_us'])} us), "
                  f"numpy {r['numpy_us']:.0f} us "
                  f"-> {_f(r['tuned_vs_default'], 2)}x default, {_f(r['tuned_vs_numpy'], 2)}x numpy", flush=True)
        rows.append({"model": name, "summary": True, "tuning_seconds": round(tune_s, 1),
                     "trials_measured_this_run": sum(r.trials_new for r in report.results),
                     "geomean_tuned_vs_default": _geomean([r["tuned_vs_default"] for r in rows
                                                           if r.get("model") == name and not r.get("summary")]),
                     "geomean_tuned_vs_numpy": _geomean([r["tuned_vs_numpy"] for r in rows
                                                         if r.get("model") == name and not r.get("summary")])})
        print(json.dumps(rows[-1]), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"threads": threads, "target": str(target), "rows": rows}, indent=1))
    print(f"wrote {out}")
    return 0


def packed_kernel(info, panel: int, schedule):
    """The bare matmul ``x @ W`` with ``W`` packed panel-major (``PackMatmulWeights``), default-scheduled."""
    import tvm
    from tvm import te

    from xpuc.compiler.passes.pack_matmul_weights import packed_matmul

    (k, n) = (int(s) for s in info[1].shape)
    if n % panel:
        return None
    x = te.placeholder([int(s) for s in info[0].shape], "float32", name="x")
    wp = te.placeholder((n // panel, k, panel), "float32", name="wp")
    func = te.create_prim_func([x, wp, packed_matmul(x, wp)]).with_attr("global_symbol", "main")
    return schedule(tvm.IRModule({"main": func}))["main"]


def _f(v, digits: int = 0) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _geomean(vals) -> float | None:
    vals = [v for v in vals if v]
    return float(np.exp(np.mean(np.log(vals)))) if vals else None


if __name__ == "__main__":
    sys.exit(main())
