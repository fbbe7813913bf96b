"""SmolLM2-135M, thresholded sparse decode (FFN fully in memory) vs llama.cpp on the same GGUF, in one run.

    python benchmarks/sparse_vs_llamacpp.py --sparsity 0.1 --tokens 64

Steps (cached under ``--work``): ``xpuc profile`` at ``--sparsity`` on license texts with the predictor, ``xpuc plan``
with a budget that holds every neuron, ``xpuc pack`` (q4_0 records, clusters of 32); then, each in its own
process so that peak RSS is its own: xpuc's ``cache`` mode with 100 % of the FFN in memory, and llama.cpp
(llama-cpp-python, Q4_1 GGUF, same thread count). Greedy decode tok/s, peak RSS (``ru_maxrss``) and the share of
identical greedy tokens. Writes ``benchmarks/results/sparse_vs_llamacpp.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TEXTS = ["/usr/share/common-licenses/Apache-2.0", "/usr/share/common-licenses/MPL-2.0",
         "/usr/share/common-licenses/GPL-2"]
EVAL = "/usr/share/common-licenses/GPL-3"
PROMPT = "The licence grants you the right to"


def xpuc(*args: str) -> None:
    print("$ xpuc " + " ".join(args), flush=True)
    subprocess.run([sys.executable, "-m", "xpuc.compiler.cli", *args], check=True)


def worker(kind: str, path: str, tokens: int, threads: int) -> None:
    """Runs in a child process; prints one JSON line."""
    import resource
    import time

    from xpuc.targets.threads import configure_tvm_threads

    configure_tvm_threads(threads)
    if kind == "xpuc":
        from xpuc.runtime.offload import OffloadModel
        from xpuc.runtime.tokenizer import XpucTokenizer

        tok = XpucTokenizer.from_artifact_dir(Path(path))
        ids = tok.encode(PROMPT)
        with OffloadModel(path, "cache", 1.0, threads=threads) as m:
            out, met = m.generate(ids, tokens)
            tps = met.summary()["tok_per_s"]
    else:
        from llama_cpp import Llama

        llm = Llama(model_path=path, n_threads=threads, n_threads_batch=threads, n_ctx=512, verbose=False)
        ids = llm.tokenize(PROMPT.encode(), add_bos=False)
        out, t_first = [], None
        for t in llm.generate(ids, temp=0.0, top_k=1, reset=True):
            out.append(int(t))
            t_first = t_first or time.perf_counter()
            if len(out) >= tokens:
                break
        tps = (len(out) - 1) / (time.perf_counter() - t_first)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"tok_per_s": tps, "peak_rss_mib": rss, "tokens": out}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sparsity", type=float, default=0.1)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--work", default=str(ROOT / ".cache" / "xpuc" / "bench-smol-sparse"))
    ap.add_argument("-o", "--output", default=str(ROOT / "benchmarks" / "results" / "sparse_vs_llamacpp.json"))
    ap.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args.worker[0], args.worker[1], args.tokens, args.threads)
    from xpuc.compiler.zoo import resolve_model

    gguf = str(resolve_model("smollm2-135m"))
    w = Path(args.work) / f"s{args.sparsity}"
    w.mkdir(parents=True, exist_ok=True)
    if not (w / "pred.safetensors").exists():
        xpuc("profile", "smollm2-135m", "--sparsity", str(args.sparsity), "--text", *TEXTS, "--max-tokens", "4096",
             "--eval-text", EVAL, "--max-eval-tokens", "512", "--cluster", "32", "-o", str(w / "stats.json"),
             "--predictor", str(w / "pred.safetensors"))
    if not (w / "art").exists():
        xpuc("plan", "smollm2-135m", "--stats", str(w / "stats.json"), "--device", "host", "--memory-budget",
             "4GiB", "--weight-dtype", "q4_0", "--cluster", "32", "--context", "512", "-o", str(w / "plan.json"))
        xpuc("pack", "smollm2-135m", "--stats", str(w / "stats.json"), "--plan", str(w / "plan.json"),
             "--predictor", str(w / "pred.safetensors"), "-o", str(w / "art"))
    rows = {}
    for kind, path in (("xpuc", str(w / "art")), ("llama.cpp", gguf)):
        r = subprocess.run([sys.executable, __file__, "--worker", kind, path, "--tokens", str(args.tokens),
                            "--threads", str(args.threads)], stdout=subprocess.PIPE, text=True, check=True)
        rows[kind] = json.loads(r.stdout.strip().splitlines()[-1])
        print(f"{kind:<10} {rows[kind]['tok_per_s']:7.1f} tok/s  peak RSS {rows[kind]['peak_rss_mib']:7.1f} MiB",
              flush=True)
    a, b = rows["xpuc"]["tokens"], rows["llama.cpp"]["tokens"]
    same = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
    report = {"sparsity": args.sparsity, "threads": args.threads, "tokens": args.tokens, "rows": rows,
              "tok_per_s_ratio": rows["xpuc"]["tok_per_s"] / rows["llama.cpp"]["tok_per_s"],
              "rss_ratio": rows["xpuc"]["peak_rss_mib"] / rows["llama.cpp"]["peak_rss_mib"],
              "identical_prefix_tokens": same}
    from xpuc.compiler.jsonfile import write_json_atomic

    write_json_atomic(args.output, report)
    print(f"xpuc/llama.cpp: {report['tok_per_s_ratio']:.2f}x tok/s, {report['rss_ratio']:.2f}x peak RSS; first "
          f"{same} greedy tokens identical; wrote {args.output}")


if __name__ == "__main__":
    main()
