"""SmolLM2-135M, thresholded sparse decode (FFN fully in memory) vs llama.cpp on the same GGUF, in one run.

    python benchmarks/sparse_vs_llamacpp.py --sparsity 0.1 --tokens 64

Steps (cached under ``--work``): ``xpuc profile`` at ``--sparsity`` on license texts with the predictor, ``xpuc plan``
with a budget that holds every neuron, ``xpuc pack`` (q4_0 records, clusters of 32), and ``xpuc compile
--quantize q4_1 --ffn-stats`` (the GGUF's own q4_1/q8_0 blocks, the profile's thresholds in the decode kernels);
then, each in its own process so that peak RSS is its own: the compiled artifact (``xpuc run``'s engine), the
offloading runtime's ``cache`` mode with 100 % of the FFN in memory (its default int8 dot products where the CPU
has them, and the same records packed with ``--dot float32``), and llama.cpp (llama-cpp-python, Q4_1 GGUF,
same thread count), in ``--repeats`` interleaved rounds. Median greedy decode tok/s (timed from the first
generated token), peak RSS (``ru_maxrss``), the
share of identical greedy tokens, and the thresholded model's top-1 agreement with the dense one on held-out
text (teacher-forced, numpy reference). Writes ``benchmarks/results/sparse_vs_llamacpp.json``.
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

    from xpuc.runtime.threads import configure_tvm_threads

    if kind.startswith("xpuc"):
        os.environ.setdefault("TVM_USE_RUNTIME_LIB", "1")  # as `xpuc run` does: no compiler in the process
    configure_tvm_threads(threads)
    if kind.startswith("xpuc"):  # both engines through the one generation loop, greedy, no stop token
        from xpuc.runtime.generation import generate
        from xpuc.runtime.tokenizer import XpucTokenizer

        if kind.startswith("xpuc-offload"):
            from xpuc.runtime.offload import OffloadModel

            session = OffloadModel(path, "cache", 1.0, threads=threads, context=512)
        else:
            from xpuc.runtime.engine import Engine

            session = Engine(path, max_context=512).session
        ids = XpucTokenizer.from_artifact_dir(Path(path)).encode(PROMPT)
        res = generate(session, ids, tokens)
        out, tps = res.tokens, res.decode_tok_s
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
    row = {"tok_per_s": tps, "peak_rss_mib": rss, "tokens": out}
    if kind == "llama.cpp":
        import llama_cpp

        row["system_info"] = llama_cpp.llama_print_system_info().decode().strip()
    print(json.dumps(row))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sparsity", type=float, default=0.1)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--eval-tokens", type=int, default=1024, help="held-out tokens for the agreement check")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved rounds; the median is reported")
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
             "--predictor", str(w / "pred.safetensors"), "--fixed-dtype", "q4_1", "-o", str(w / "art"))
    f32 = w / "art-float32"  # the same records with float32 dot products: what the int8 ones change
    if not f32.exists():
        xpuc("pack", "smollm2-135m", "--stats", str(w / "stats.json"), "--plan", str(w / "plan.json"),
             "--predictor", str(w / "pred.safetensors"), "--fixed-dtype", "q4_1", "--dot", "float32", "-o", str(f32))
    if not (w / "compiled").exists():
        xpuc("compile", "smollm2-135m", "-o", str(w / "compiled"), "--quantize", "q4_1", "--ffn-stats",
             str(w / "stats.json"))
    dense = Path(args.work) / "compiled-dense"  # same kernels, thresholds 0: what the sparsity itself buys
    if not dense.exists():
        xpuc("compile", "smollm2-135m", "-o", str(dense), "--quantize", "q4_1")
    engines = (("xpuc-compiled", str(w / "compiled")), ("xpuc-compiled-dense", str(dense)),
               ("xpuc-offload", str(w / "art")), ("xpuc-offload-float32", str(f32)), ("llama.cpp", gguf))
    runs: dict[str, list[dict]] = {kind: [] for kind, _ in engines}
    for rnd in range(args.repeats):  # interleaved rounds: a slow spell of the host hits every engine
        for kind, path in engines:
            r = subprocess.run([sys.executable, __file__, "--worker", kind, path, "--tokens", str(args.tokens),
                                "--threads", str(args.threads)], stdout=subprocess.PIPE, text=True, check=True)
            runs[kind].append(json.loads(r.stdout.strip().splitlines()[-1]))
            print(f"round {rnd + 1}: {kind:<20} {runs[kind][-1]['tok_per_s']:7.1f} tok/s  peak RSS "
                  f"{runs[kind][-1]['peak_rss_mib']:7.1f} MiB", flush=True)
    rows = {}
    for kind, rs in runs.items():  # the median round's figures; every round's tok/s kept
        med = sorted(rs, key=lambda r: r["tok_per_s"])[len(rs) // 2]
        rows[kind] = {**med, "tok_per_s_rounds": [r["tok_per_s"] for r in rs]}
    ref = rows["llama.cpp"]
    xpuc_rows = ("xpuc-compiled", "xpuc-compiled-dense", "xpuc-offload", "xpuc-offload-float32")
    for kind in xpuc_rows:
        a, b = rows[kind]["tokens"], ref["tokens"]
        rows[kind].update(
            tok_per_s_ratio=rows[kind]["tok_per_s"] / ref["tok_per_s"],
            rss_ratio=rows[kind]["peak_rss_mib"] / ref["peak_rss_mib"],
            identical_prefix_tokens=next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y),
                                         min(len(a), len(b))))
    print(f"llama.cpp system_info: {ref.get('system_info')}")
    quality = _quality(gguf, w / "stats.json", args.eval_tokens)
    report = {"sparsity": args.sparsity, "threads": args.threads, "tokens": args.tokens, "repeats": args.repeats,
              "rows": rows,
              "quality": quality}
    from xpuc.runtime.formats.jsonfile import write_json_atomic

    write_json_atomic(args.output, report)
    for kind in xpuc_rows:
        r = rows[kind]
        print(f"{kind}/llama.cpp: {r['tok_per_s_ratio']:.2f}x tok/s, {r['rss_ratio']:.2f}x peak RSS; first "
              f"{r['identical_prefix_tokens']} greedy tokens identical")
    print(f"thresholded vs dense: top-1 agreement {quality['top1_agreement']:.3f} on {quality['tokens']} held-out "
          f"tokens, {quality['computed_share']:.1%} of FFN neurons computed; wrote {args.output}")


def _quality(gguf: str, stats: Path, max_tokens: int) -> dict:
    """Top-1 agreement of the thresholded model with the dense one, teacher-forced on held-out text."""
    from xpuc.compiler.frontends import load_model
    from xpuc.compiler.profiler import read_text_files
    from xpuc.compiler.sparse_quality import measure_quality
    from xpuc.runtime.formats.profile_stats import ProfileStats
    from xpuc.runtime.tokenizer import XpucTokenizer

    spec = load_model(gguf)
    ids = XpucTokenizer.from_source(spec.tokenizer).encode(read_text_files([EVAL]))[:max_tokens]
    r = measure_quality(spec, ids, ProfileStats.load(stats).thresholds)
    return {"tokens": r.tokens, "top1_agreement": r.top1_agreement, "perplexity_dense": r.perplexity_dense,
            "perplexity_sparse": r.perplexity_sparse, "computed_share": r.computed_share, "text": EVAL}


if __name__ == "__main__":
    main()
