"""The whole ONNX node test suite (shipped with the ``onnx`` package) through xpuc's ONNX path, classified.

    python benchmarks/onnx_node_suite.py [--only OP,...] [-o benchmarks/results/onnx_node_suite.json]

Every case goes the way of ``xpuc compile CASE.onnx`` (read, check, prepare with onnxslim, import, xpuc's
pipeline, build) and, where it compiles, runs on the host against the case's expected outputs. Each case lands in
one class:

* ``pass`` — compiled, ran, outputs match (rtol 1e-3, atol 1e-4);
* ``mismatch`` — compiled and ran, wrong values or shapes;
* ``refused`` — a clean ``xpuc: error:`` (an operator xpuc does not claim, a graph TVM cannot import or lower);
* ``not_tensor`` — string / sequence / optional data: not part of a compiled graph's interface;
* ``xpuc_crash`` — an exception raised in xpuc's own code (its passes, schedules, runtime): a bug;
* ``run_error`` — compiled but failed at run time.

A refusal whose cause is an exception inside xpuc's code (the CLI reports it as "TVM cannot lower this graph") is
counted as ``xpuc_crash``: the deepest frame of the traceback decides. Writes a JSON report with every case.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def _plain(arrays) -> bool:
    try:
        return all(np.asarray(a).dtype != object for a in arrays)
    except ValueError:
        return False


def _raised_in_xpuc(exc: BaseException) -> bool:
    """Whether the innermost Python frame of ``exc`` (or of the exception it was raised from) is xpuc's code."""
    while exc.__cause__ is not None or exc.__context__ is not None:
        exc = exc.__cause__ or exc.__context__
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return False
    inner = frames[-1].filename
    return str(ROOT) in inner and "site-packages" not in inner


def run_case(case, tmp: Path) -> tuple[str, str]:
    import onnx

    from xpuc.compiler.build import compile_onnx
    from xpuc.compiler.frontend_onnx import STATIC_INPUTS, freeze_inputs
    from xpuc.runtime.errors import XpucError
    from xpuc.runtime.graph import GraphRunner

    inputs, outputs = case.data_sets[0]
    if not _plain(list(inputs) + list(outputs)):
        return "not_tensor", ""
    ops = sorted({n.op_type for n in case.model.graph.node})
    names = [i.name for i in case.model.graph.input]
    static = {}
    if len(ops) == 1:
        static = {names[k]: inputs[k] for k in STATIC_INPUTS.get(ops[0], []) if k < min(len(names), len(inputs))}
    model = freeze_inputs(case.model, static) if static else case.model
    path = tmp / f"{case.name}.onnx"
    onnx.save(model, str(path))
    try:
        runner = GraphRunner(compile_onnx(path, tmp / case.name, quiet=True))
    except XpucError as e:
        cause = e.__cause__ or e.__context__
        if cause is not None and _raised_in_xpuc(cause):
            return "xpuc_crash", f"{e}"
        return "refused", str(e)
    except Exception as e:  # noqa: BLE001 - an uncaught exception is the finding
        where = traceback.extract_tb(e.__traceback__)[-1]
        kind = "xpuc_crash" if _raised_in_xpuc(e) else "refused"
        return kind, f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:200] if str(e).strip() else ''} " \
                     f"({Path(where.filename).name}:{where.lineno})"
    feeds = {n: np.asarray(a) for n, a in zip(names, inputs, strict=False) if n not in static}
    try:
        outs = runner(*[feeds[n] for n in runner.inputs])
    except Exception as e:  # noqa: BLE001
        return ("xpuc_crash" if _raised_in_xpuc(e) else "run_error"), f"{type(e).__name__}: {str(e)[:200]}"
    for k, want in enumerate(outputs):
        got, want = np.asarray(outs[k]), np.asarray(want)
        if got.shape != want.shape or not np.allclose(got.astype(np.float64), want.astype(np.float64),
                                                      rtol=1e-3, atol=1e-4, equal_nan=True):
            return "mismatch", f"output {k}: {got.shape} vs {want.shape}"
    return "pass", ""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default=None, help="comma-separated operators: only cases made of these")
    ap.add_argument("-o", "--output", default=str(ROOT / "benchmarks" / "results" / "onnx_node_suite.json"))
    args = ap.parse_args()
    from onnx.backend.test.case import node

    from xpuc.compiler.frontend_onnx import CLAIMED_OPS
    from xpuc.runtime.formats.jsonfile import write_json_atomic

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cases = node.collect_testcases(None)
    only = set(args.only.split(",")) if args.only else None
    rows, t0 = [], time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        for i, case in enumerate(cases):
            ops = sorted({n.op_type for n in case.model.graph.node})
            if only is not None and not set(ops) <= only:
                continue
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                cls, detail = run_case(case, Path(d))
            rows.append({"case": case.name, "ops": ops, "claimed": set(ops) <= CLAIMED_OPS, "class": cls,
                         "detail": detail})
            if cls == "xpuc_crash":
                print(f"xpuc_crash {case.name}: {detail}", flush=True)
            if (i + 1) % 100 == 0:
                print(f"{i + 1}/{len(cases)} cases, {time.perf_counter() - t0:.0f} s: "
                      f"{dict(Counter(r['class'] for r in rows))}", flush=True)
    counts = Counter(r["class"] for r in rows)
    claimed = Counter(r["class"] for r in rows if r["claimed"])
    report = {"cases": len(rows), "classes": dict(counts), "claimed_cases": dict(claimed), "rows": rows}
    write_json_atomic(args.output, report)
    print(f"{len(rows)} cases: {dict(counts)}; claimed operators only: {dict(claimed)}; wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
