"""Quality of activation sparsity in every projection (TEAL-style), measured on real models.

Per sparsity level: thresholds calibrated on one license text (``--text``, first ``--max-tokens`` tokens), then
teacher-forced top-1 agreement and perplexity of the thresholded model against the dense one on a held-out
license text (``--eval-text``), with the fp16-rounded numpy reference (the same arithmetic the profiler uses).
This is the quality the column-stored kernels (``schedules/linear_cols.py``) would cost at decode time.

    python benchmarks/act_sparsity.py [--model smollm2-135m | PATH.gguf] [--sparsity 0.25,0.4,0.5]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", str(os.cpu_count() or 1))

from xpuc.compiler.act_sparsity import calibrate_thresholds, measure_act_sparsity  # noqa: E402
from xpuc.compiler.frontends import load_model  # noqa: E402
from xpuc.compiler.zoo import resolve_model  # noqa: E402
from xpuc.runtime.tokenizer import XpucTokenizer  # noqa: E402

TEXT = "/usr/share/common-licenses/Apache-2.0"
EVAL = "/usr/share/common-licenses/GPL-3"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m", help="a bundled model name or a GGUF / HF path")
    ap.add_argument("--sparsity", default="0.25,0.4,0.5", help="comma-separated target sparsities")
    ap.add_argument("--text", default=TEXT, help="calibration text")
    ap.add_argument("--eval-text", default=EVAL, help="held-out text")
    ap.add_argument("--max-tokens", type=int, default=512, help="calibration tokens")
    ap.add_argument("--max-eval-tokens", type=int, default=512, help="held-out tokens scored")
    ap.add_argument("--points", default="attn,o,ffn,down", help="projection inputs made sparse (the rest dense)")
    ap.add_argument("-o", "--output", default=None, help="JSON results")
    args = ap.parse_args(argv)
    levels = [float(s) for s in args.sparsity.split(",")]
    spec = load_model(resolve_model(args.model))
    tok = XpucTokenizer.from_source(spec.tokenizer)
    cal = tok.encode(Path(args.text).read_text(), add_bos=False)[: args.max_tokens]
    held = tok.encode(Path(args.eval_text).read_text(), add_bos=False)[: args.max_eval_tokens]
    rows = []
    print(f"{Path(spec.source).name}, sparse inputs {args.points}: {len(cal)} calibration tokens "
          f"({Path(args.text).name}), {len(held)} held-out ({Path(args.eval_text).name})", flush=True)
    print("| sparsity | inputs kept | top-1 agreement | PPL dense | PPL sparse | PPL change |")
    print("|---|---|---|---|---|---|")
    for s in levels:
        t0 = time.perf_counter()
        q = measure_act_sparsity(spec, held, calibrate_thresholds(spec, cal, s, points=tuple(args.points.split(","))))
        change = q.perplexity_sparse / q.perplexity_dense - 1
        rows.append({"sparsity": s, "kept": q.computed_share, "top1_agreement": q.top1_agreement,
                     "ppl_dense": q.perplexity_dense, "ppl_sparse": q.perplexity_sparse, "ppl_change": change,
                     "seconds": time.perf_counter() - t0})
        print(f"| {s:.2f} | {100 * q.computed_share:.1f} % | {q.top1_agreement:.3f} | {q.perplexity_dense:.3f} | "
              f"{q.perplexity_sparse:.3f} | {100 * change:+.2f} % |", flush=True)
    if args.output:
        Path(args.output).write_text(json.dumps({"model": str(spec.source), "points": args.points, "text": args.text,
                                                 "eval_text": args.eval_text, "calibration_tokens": len(cal),
                                                 "held_out_tokens": len(held), "results": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
