"""Dense decode on SmolLM2-135M: xpuc vs llama.cpp in one run, and xpuc's fraction of the roofline.

Usage:  python benchmarks/decode_dense.py [--tokens 128] [--threads N] [--quantize q4_1] [--out FILE]

* xpuc: the compiled artifact built from the bundled GGUF: fp16 weights, fp32 compute; with ``--quantize q4_1``
  the GGUF's own Q4_1 / Q8_0 blocks (results then go to ``decode_dense_q4_1.json`` by default).
* llama.cpp: llama-cpp-python on the same GGUF (Q4_1 weights), same thread count; skipped with a note
  when llama-cpp-python is not installed (``pip install 'xpuc[peer]'``).
* roofline: weight bytes read per decoded token / time per token, against the read bandwidth
  measured by a compiled parallel reduction on this machine.
* agreement: first 32 greedy tokens of xpuc vs llama.cpp on the 12 prompts of ``xpuc.runtime.prompts``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

from xpuc.runtime.prompts import PEER_AGREE, PEER_ALL


def xpuc_engine(model: Path, work: Path, quantize: str | None = None):
    from xpuc.compiler.build import compile_model
    from xpuc.runtime.engine import Engine

    art = work / ("smollm2-135m" + (f"-{quantize}" if quantize else ""))
    if not (art / "manifest.json").exists():
        compile_model(model, art, quiet=True, quantize=quantize)
    return Engine(art, max_context=1024)


def xpuc_decode(engine, prompt_ids: list[int], tokens: int) -> tuple[float, list[int]]:
    res = engine.generate_ids(prompt_ids, tokens, stop_ids=[])
    return res.decode_tok_s, res.tokens


def llama_cpp_model(model: Path, threads: int):
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    return Llama(model_path=str(model), n_threads=threads, n_threads_batch=threads, n_ctx=1024,
                 verbose=False, logits_all=False)


def llama_cpp_decode(llm, prompt_ids: list[int], tokens: int) -> tuple[float, list[int]]:
    llm.reset()
    out: list[int] = []
    t_first = None
    for tok in llm.generate(prompt_ids, temp=0.0, top_k=1, reset=True):
        out.append(int(tok))
        if t_first is None:
            t_first = time.perf_counter()
        if len(out) >= tokens:
            break
    t_end = time.perf_counter()
    return (len(out) - 1) / (t_end - t_first), out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--work", default="artifacts/bench")
    ap.add_argument("--quantize", default=None, choices=["q4_0", "q4_1", "q8_0"])
    ap.add_argument("--out", default=None, help="default: benchmarks/results/decode_dense[_FORMAT].json")
    args = ap.parse_args()
    args.out = args.out or f"benchmarks/results/decode_dense{'_' + args.quantize if args.quantize else ''}.json"

    from xpuc.runtime.threads import configure_tvm_threads

    threads = configure_tvm_threads(args.threads)
    from bandwidth import measure_read_bandwidth

    from xpuc.compiler.zoo import fetch

    model = fetch("smollm2-135m")
    work = Path(args.work)
    print(f"threads: {threads}", file=sys.stderr)
    print("compiling / loading xpuc artifact ...", file=sys.stderr)
    engine = xpuc_engine(model, work, args.quantize)
    llm = llama_cpp_model(model, threads)
    bw = measure_read_bandwidth()
    prompt = engine.encode_prompt("Explain what a compiler does in one paragraph.", chat=True)
    xs, ls = [], []
    for r in range(args.repeats):
        xs.append(xpuc_decode(engine, prompt, args.tokens)[0])
        if llm is not None:
            ls.append(llama_cpp_decode(llm, prompt, args.tokens)[0])
        print(f"  run {r + 1}: xpuc {xs[-1]:.1f} tok/s" + (f", llama.cpp {ls[-1]:.1f} tok/s" if ls else ""),
              file=sys.stderr)
    # the roofline denominator is the best bandwidth seen before or after the runs (conservative)
    bw = max(bw, measure_read_bandwidth())
    print(f"measured read bandwidth: {bw:.1f} GB/s", file=sys.stderr)
    x_tps = statistics.median(xs)
    bytes_per_token = engine.weight_bytes
    roof = bytes_per_token * x_tps / 1e9 / bw

    agreement = []
    if llm is not None:
        for p in PEER_ALL:
            ids = engine.encode_prompt(p, chat=True)
            a = engine.generate_ids(ids, 32).tokens
            b = llama_cpp_decode(llm, ids, len(a))[1]
            agreement.append({"prompt": p, "agreement_set": p in PEER_AGREE, "identical": a == b[: len(a)],
                              "first_difference": next((i for i, (u, v) in enumerate(zip(a, b, strict=False))
                                                        if u != v), None)})
    result = {
        "model": "SmolLM2-135M-Instruct (GGUF Q4_1; xpuc runs it as "
                 + (f"{args.quantize} blocks, embedding q8_0)" if args.quantize else "fp16 weights)"),
        "threads": threads, "tokens": args.tokens, "cpu": os.uname().machine,
        "xpuc_decode_tok_s": round(x_tps, 2),
        "llama_cpp_decode_tok_s": round(statistics.median(ls), 2) if ls else None,
        "xpuc_vs_llama_cpp": round(x_tps / statistics.median(ls), 3) if ls else None,
        "weight_bytes_per_token": bytes_per_token,
        "measured_read_bandwidth_gbps": round(bw, 2),
        "xpuc_roofline_fraction": round(roof, 3),
        "greedy_agreement_32_tokens": agreement,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"xpuc decode        {x_tps:8.1f} tok/s   ({roof * 100:.0f} % of the {bw:.1f} GB/s roofline, "
          f"{bytes_per_token / 2**20:.0f} MiB of {args.quantize or 'fp16'} weights per token)")
    if ls:
        print(f"llama.cpp decode   {statistics.median(ls):8.1f} tok/s   (Q4_1 weights)")
        agree = [a for a in agreement if a["agreement_set"]]
        print(f"greedy agreement   {sum(a['identical'] for a in agree)}/{len(agree)} prompts of the agreement set, "
              f"{sum(a['identical'] for a in agreement)}/{len(agreement)} of all, identical for 32 tokens")
    else:
        print("llama.cpp          not installed (pip install 'xpuc[peer]')")
    print(f"written {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
