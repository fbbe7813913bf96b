"""Prefill on the host: xpuc's compiled ONNX path vs onnxruntime on the same SmolLM2-shaped decoder graph.

Usage: python benchmarks/prefill.py [--layers 2] [--tokens 16,128,512] [--out benchmarks/results/prefill.json]
                                    [--tuning-db DIR]

The graph (``xpuc.compiler.onnx_export.decoder_prefill_onnx``) has SmolLM2-135M's layer shapes (d=576,
9/3 heads of 64, FFN 1536) with random weights; ``--layers`` sets how many layers (30 = the full model's
stack, without embedding and LM head). Both engines run in this process with the same thread count; tokens/s
is the sequence length over the best of ``--rounds`` interleaved rounds (``timing.interleaved_best``).

A second xpuc build has a static copy of the graph per ``--tokens`` length (``xpuc compile --buckets``, same
default schedules, no database). With ``--tuning-db DIR`` (from ``xpuc tune`` or ``benchmarks/tuning.py``) a
third build applies the database to such static copies; all are timed in the same run.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from timing import interleaved_best


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--tokens", default="16,128,512")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (best is kept)")
    ap.add_argument("--out", default="benchmarks/results/prefill.json")
    ap.add_argument("--tuning-db", default=None, help="also time a build that applies this tuning database")
    args = ap.parse_args()

    from xpuc.runtime.threads import configure_tvm_threads

    threads = configure_tvm_threads(args.threads)
    import onnxruntime as ort

    from xpuc.compiler.build import compile_onnx
    from xpuc.compiler.onnx_export import causal_mask, decoder_prefill_onnx, rope_tables
    from xpuc.runtime.formats.arch import ArchConfig
    from xpuc.runtime.graph import GraphRunner

    cfg = ArchConfig("llama", 49152, 576, 1536, args.layers, 9, 3, 64, 1e5, 1e-5, "swiglu", True, False, 8192)
    rng = np.random.default_rng(0)
    weights = {n: (rng.standard_normal(s) * (0.02 if len(s) == 2 else 1.0) + (1.0 if n.endswith("norm") else 0.0))
               .astype(np.float32) for n, s in cfg.weight_shapes().items() if not n.startswith(("embed", "final"))}
    rows = []
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        path = decoder_prefill_onnx(d / "dec.onnx", cfg, weights)
        t0 = time.perf_counter()
        runner = GraphRunner(compile_onnx(path, d / "art", quiet=True))
        compile_s = time.perf_counter() - t0
        lengths = tuple(int(t) for t in args.tokens.split(","))
        # the same default schedules with a static copy of the graph per benchmarked length (no database)
        static = GraphRunner(compile_onnx(path, d / "static", quiet=True, buckets=lengths))
        tuned = None
        if args.tuning_db:
            tuned = GraphRunner(compile_onnx(path, d / "tuned", quiet=True, tuning_db=args.tuning_db,
                                             buckets=tuple(int(t) for t in args.tokens.split(","))))
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        for n in (int(t) for t in args.tokens.split(",")):
            x = rng.standard_normal((1, n, 576)).astype(np.float32)
            cos, sin = rope_tables(n, 64, 1e5)
            mask = causal_mask(n)
            feeds = {"x": x, "cos": cos, "sin": sin, "mask": mask}
            engines = {"xpuc": lambda x=x, cos=cos, sin=sin, mask=mask: runner(x, cos, sin, mask),
                       "static": lambda x=x, cos=cos, sin=sin, mask=mask: static(x, cos, sin, mask),
                       "ort": lambda feeds=feeds: sess.run(None, feeds)}
            if tuned is not None:
                engines["tuned"] = lambda x=x, cos=cos, sin=sin, mask=mask: tuned(x, cos, sin, mask)
            best = interleaved_best(engines, args.rounds)
            t_x, t_o = best["xpuc"], best["ort"]
            got = runner(x, cos, sin, mask)[0]
            want = sess.run(None, {"x": x, "cos": cos, "sin": sin, "mask": mask})[0]
            err = float(np.abs(got - want).max() / np.abs(want).max())
            got_s = static(x, cos, sin, mask)[0]
            r = {"tokens": n, "xpuc_tok_s": n / t_x, "onnxruntime_tok_s": n / t_o, "ratio": t_o / t_x,
                 "max_rel_diff": err, "static_tok_s": n / best["static"], "static_ratio": t_o / best["static"],
                 "static_max_rel_diff": float(np.abs(got_s - want).max() / np.abs(want).max())}
            if tuned is not None:
                t_t = best["tuned"]
                got_t = tuned(x, cos, sin, mask)[0]
                r.update(tuned_tok_s=n / t_t, tuned_ratio=t_o / t_t, tuned_function=tuned.last_function,
                         tuned_max_rel_diff=float(np.abs(got_t - want).max() / np.abs(want).max()))
            rows.append(r)
            print(f"{n:4d} tokens: xpuc {r['xpuc_tok_s']:9.1f} tok/s | onnxruntime {r['onnxruntime_tok_s']:9.1f} tok/s"
                  f" | xpuc/ort {r['ratio']:.3f} | max rel diff {err:.1e}"
                  f" | static copy {r['static_tok_s']:9.1f} tok/s ({r['static_ratio']:.3f}x ort)"
                  + (f" | tuned {r['tuned_tok_s']:9.1f} tok/s ({r['tuned_ratio']:.3f}x ort, {r['tuned_function']})"
                     if tuned is not None else ""))
    out = {"layers": args.layers, "threads": threads, "compile_s": compile_s, "rounds": args.rounds,
           "schedules": "default (untuned)" + (f" and tuned ({args.tuning_db})" if args.tuning_db else ""),
           "tuned_kernels": tuned.manifest.modules[0].info if tuned is not None else None, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"written {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
