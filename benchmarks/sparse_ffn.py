"""Sparse neuron-cluster FFN kernels vs the dense TVM kernel (same layout) vs numpy dense, on this host.

Usage: python benchmarks/sparse_ffn.py [--shapes 7b,smollm2] [--dtypes float16,q4_0,...] [--kind reglu]
       [--sparsity 0.5,0.8,0.9,0.95] [--out benchmarks/results/sparse_ffn.json]

For each shape x dtype x sparsity: median time of one call (inputs already device-resident) of the
sparse kernel over a random set of active clusters
(fraction 1 - sparsity), of the dense kernel (all neurons, no skipping) and of numpy's dense FFN
(``down @ (act(gate @ x) * (up @ x))`` in float32), the speed-ups, and the sparse kernel's effective
bandwidth on the bytes it actually touches (gate rows of active clusters + up/down rows of the neurons
whose gate fired) against the read bandwidth measured on this machine.
"""

from __future__ import annotations

import argparse
import json
import sys
from functools import partial
from pathlib import Path

import numpy as np
from timing import median_time

SHAPES = {"7b": (4096, 14336), "smollm2": (576, 1536)}


def numpy_dense_ffn(gate: np.ndarray, up: np.ndarray, down: np.ndarray, x: np.ndarray) -> np.ndarray:
    return down @ (np.maximum(gate @ x, 0) * (up @ x))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="7b,smollm2")
    ap.add_argument("--dtypes", default="float32,float16,q4_0,q4_1")
    ap.add_argument("--kind", default="reglu")
    ap.add_argument("--cluster", type=int, default=32)
    ap.add_argument("--sparsity", default="0.5,0.8,0.9,0.95")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default="benchmarks/results/sparse_ffn.json")
    args = ap.parse_args()

    from xpuc.runtime.threads import configure_tvm_threads

    threads = configure_tvm_threads(args.threads)
    from bandwidth import measure_read_bandwidth

    from xpuc.runtime.formats.bundle import BundleLayout, bundle_ffn, dequantize_bundle
    from xpuc.schedules.sparse_ffn_host import SparseFFNKernel

    bw = measure_read_bandwidth()
    print(f"threads {threads}, measured read bandwidth {bw:.1f} GB/s", file=sys.stderr)
    rows = []
    rng = np.random.default_rng(0)
    for shape in args.shapes.split(","):
        d, f = SHAPES[shape]
        gate = rng.standard_normal((f, d), dtype=np.float32) * 0.02
        up = rng.standard_normal((f, d), dtype=np.float32) * 0.02
        down = rng.standard_normal((d, f), dtype=np.float32) * 0.02
        x = rng.standard_normal(d, dtype=np.float32)
        t_np = median_time(partial(numpy_dense_ffn, gate, up, down, x), 7)
        for dtype in args.dtypes.split(","):
            layout = BundleLayout(args.kind, d, f, args.cluster, dtype)
            bundle = bundle_ffn(layout, up, down, gate)
            kern = SparseFFNKernel(layout, bundle, threads=threads)
            t_dense = median_time(kern.bind(x, None), 7)
            w = dequantize_bundle(layout, bundle)
            fired = (np.einsum("ncd,d->nc", w[:, :, 0], x) > 0)  # neurons whose gate fires
            del w
            row_bytes = layout.row_length * np.dtype(layout.storage_dtype).itemsize
            for sp in (float(s) for s in args.sparsity.split(",")):
                k = max(1, int(round(layout.n_clusters * (1 - sp))))
                idx = np.sort(rng.choice(layout.n_clusters, k, replace=False)).astype(np.int32)
                t_sparse = median_time(kern.bind(x, idx), 15)
                touched = k * layout.cluster * row_bytes + int(fired[idx].sum()) * 2 * row_bytes
                r = {"shape": shape, "d": d, "n": f, "dtype": dtype, "kind": args.kind, "cluster": args.cluster,
                     "sparsity": sp, "active_clusters": k, "sparse_ms": t_sparse * 1e3, "dense_tvm_ms": t_dense * 1e3,
                     "numpy_dense_ms": t_np * 1e3, "speedup_vs_dense_tvm": t_dense / t_sparse,
                     "speedup_vs_numpy": t_np / t_sparse, "touched_mb": touched / 1e6,
                     "effective_gbps": touched / t_sparse / 1e9, "bandwidth_fraction": touched / t_sparse / 1e9 / bw}
                rows.append(r)
                print(f"{shape:8s} {dtype:8s} sparsity {sp:.2f}: sparse {r['sparse_ms']:8.3f} ms | dense TVM "
                      f"{r['dense_tvm_ms']:8.2f} ms ({r['speedup_vs_dense_tvm']:5.1f}x) | numpy "
                      f"{r['numpy_dense_ms']:8.2f} ms ({r['speedup_vs_numpy']:5.1f}x) | "
                      f"{r['effective_gbps']:5.1f} GB/s = {100 * r['bandwidth_fraction']:3.0f} % of {bw:.1f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"threads": threads, "bandwidth_gbps": bw, "rows": rows}, indent=1))
    print(f"written {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
