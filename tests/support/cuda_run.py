"""Run the CUDA kernels exported by ``support.cuda_check`` on this machine's NVIDIA GPU (numpy + CuPy).

    python tests/support/cuda_run.py CASE_DIR [REPORT.json]

Each function's source is compiled with NVRTC (``cupy.RawModule``), its kernels are launched in order with the
recorded grid and block sizes on the exported inputs, and every buffer is compared with the host CPU's
results. Also times each function (CUDA events, median of 20 launches of its kernels). Needs no TVM.
Exit status 1 when a function's results differ (relative error above 1e-4) or no buffer changed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

TOLERANCE = 1e-4


def case_inputs(specs: list[dict], seed: int, int_high: int) -> dict[str, np.ndarray]:
    """The inputs of a case, regenerated identically where they are exported (``cuda_check`` imports this)."""
    rng = np.random.default_rng(seed)
    out = {}
    for sp in specs:
        if "int" in sp["dtype"]:
            out[sp["key"]] = rng.integers(0, int_high, sp["shape"]).astype(sp["dtype"])
        else:
            out[sp["key"]] = rng.standard_normal(sp["shape"]).astype(sp["dtype"])
    return out


def run_case(case: dict, root: Path, cp) -> dict:
    src = (root / case["source"]).read_text()
    mod = cp.RawModule(code=src, options=("--std=c++17",))
    data = np.load(root / case["arrays"])
    initial = case_inputs(case["inputs"], case["seed"], case["int_high"])
    for k, a in initial.items():
        if not np.isclose(float(np.sum(a, dtype=np.float64)), case["input_sums"][k], rtol=1e-12, atol=1e-9):
            raise RuntimeError(f"input {k} regenerated differently here (numpy version?)")
    bufs = {k: cp.asarray(initial[k]) for k in case["keys"]}
    for name, spec in case["scratch"].items():
        bufs[name] = cp.zeros(spec["shape"], spec["dtype"])
    scalars = case["scalars"]
    calls = []
    for ki, k in enumerate(case["launches"]):
        fn = mod.get_function(k["name"])
        args = []
        for kind, name in k["args"]:
            if kind == "buf":
                args.append(bufs[f"{name}#{ki}" if f"{name}#{ki}" in bufs else name])
            elif kind == "long":
                args.append(np.int64(scalars[name]))
            elif kind == "int":
                args.append(np.int32(scalars[name]))
            else:
                args.append(np.float32(scalars[name]))
        calls.append((fn, tuple(k["grid"]), tuple(k["block"]), tuple(args)))
    for fn, grid, block, args in calls:
        fn(grid, block, args)
    cp.cuda.Device().synchronize()
    worst, wrote = 0.0, False
    for k in case["keys"]:
        have = cp.asnumpy(bufs[k]).astype(np.float64)
        want = (data[f"want:{k}"] if f"want:{k}" in data else initial[k]).astype(np.float64)
        if want.size:
            worst = max(worst, float(np.abs(want - have).max()) / max(1.0, float(np.abs(want).max())))
        wrote = wrote or not np.array_equal(initial[k], cp.asnumpy(bufs[k]))
    start, end = cp.cuda.Event(), cp.cuda.Event()
    times = []
    for _ in range(20):
        start.record()
        for fn, grid, block, args in calls:
            fn(grid, block, args)
        end.record()
        end.synchronize()
        times.append(cp.cuda.get_elapsed_time(start, end) * 1e3)
    return {"name": case["name"], "kernels": len(calls), "max_rel_error": worst, "wrote": wrote,
            "us": float(np.median(times)), "ok": wrote and worst <= TOLERANCE}


def main() -> int:
    import cupy as cp

    root = Path(sys.argv[1])
    meta = json.loads((root / "cases.json").read_text())
    rows = []
    for case in meta["cases"]:
        try:
            rows.append(run_case(case, root, cp))
        except Exception as e:  # noqa: BLE001 - one failing function must not hide the others
            rows.append({"name": case["name"], "ok": False, "error": f"{type(e).__name__}: {str(e)[:300]}"})
        r = rows[-1]
        print(f"{r['name']:40s} " + (f"{r['kernels']} kernels, max rel err {r['max_rel_error']:.1e}, "
                                     f"{r['us']:.1f} us" if "error" not in r else r["error"]), flush=True)
    dev = cp.cuda.runtime.getDeviceProperties(0)
    report = {"device": dev["name"].decode() if isinstance(dev["name"], bytes) else str(dev["name"]),
              "arch": meta["arch"], "seq": meta["seq"], "functions": len(rows),
              "kernels": sum(r.get("kernels", 0) for r in rows), "failed": [r["name"] for r in rows if not r["ok"]],
              "rows": rows}
    if len(sys.argv) > 2:
        Path(sys.argv[2]).write_text(json.dumps(report, indent=1))
    print(f"{report['functions']} functions, {report['kernels']} kernels on {report['device']}: "
          f"{len(report['failed'])} failed")
    return 1 if report["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
