"""Whole generated models on flash, xpuc against llama.cpp on the same weights, side by side in one run.

    python benchmarks/peer_offload.py                                   # TurboSparse-Mistral-7B shape, 32 layers
    python benchmarks/peer_offload.py --shape mixtral-8x7b-sparse --budgets 7GiB,19GiB

1. Generates the model at full depth, streamed into one Q4_0 GGUF (``xpuc synth -o model.gguf``): xpuc reads it
   as dReLU, llama.cpp as SwiGLU (llama.cpp has no dReLU; its decode reads the same bytes and does the same
   arithmetic per token, with different values).
2. Builds llama.cpp natively from the ``llama-cpp-python==0.3.36`` sdist (``benchmarks/llamacpp_build.py``;
   AMX off where the native build traps) and prints its ``system_info`` line.
3. Profiles the model on a license text, trains the predictor, plans for this host (its measured disk curve)
   and packs it (int4 q4_0 records; the fixed segment in `--fixed-dtype`, q4_0 by default).
4. Runs, interleaved, ``--repeats`` rounds, each engine in its own process: xpuc ``bench`` (``--modes``) at each
   budget; llama.cpp's ``llama-bench`` (mmap, its default) with all memory, and with only the memory xpuc's
   process used at that budget (its peak RSS) available, the rest held by ``benchmarks/memory_balloon.py``.

Budgets are shares of the FFN (``50%``) or sizes of the FFN memory (``7GiB``). Writes
``benchmarks/results/peer_offload_<shape>.json`` and prints a table. Every step is cached under ``--work``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from llamacpp_build import build_llamacpp  # noqa: E402
from offload import EVAL, ROOT, TEXT, xpuc  # noqa: E402


def prepare(args: argparse.Namespace, w: Path) -> tuple[Path, Path]:
    """The GGUF and the packed model (made once, cached in ``w``)."""
    gguf = w / "model.gguf"
    if not gguf.is_file():
        xpuc("synth", "--shape", args.shape, "--sparsity", "0.88" if "mixtral" in args.shape else "0.9",
             "--seed", "1", *(["--layers", str(args.layers)] if args.layers else []), "-o", str(gguf))
    if not (w / "pred.safetensors").is_file():
        xpuc("profile", str(gguf), "--text", TEXT, "--max-tokens", str(args.calib_tokens), "--recall", "0.98",
             *(["--eval-text", EVAL, "--max-eval-tokens", "256"] if args.eval else []),
             "-o", str(w / "stats.json"), "--predictor", str(w / "pred.safetensors"))
    if not (w / "plan.json").is_file():
        xpuc("plan", str(gguf), "--stats", str(w / "stats.json"), "--device", "host", "--memory-budget", "64GiB",
             "--weight-dtype", "q4_0", "--cluster", "1", "--context", "512", "-o", str(w / "plan.json"))
    art = w / f"packed-{args.records}-{args.fixed_dtype}"
    if not art.is_dir():
        xpuc("pack", str(gguf), "--stats", str(w / "stats.json"), "--plan", str(w / "plan.json"),
             "--predictor", str(w / "pred.safetensors"), "--fixed-dtype", args.fixed_dtype, "--records", args.records,
             "-o", str(art))
    return gguf, art


def run_xpuc(art: Path, budget: str, modes: str, tokens: int, out: Path) -> list[dict]:
    xpuc("bench", str(art), "--budget", budget, "--modes", modes, "--tokens", str(tokens), "--repeats", "1",
         "-o", str(out))
    return json.loads(out.read_text())["modes"]


def run_llamacpp(bin_dir: Path, gguf: Path, tokens: int, leave: int | None) -> dict:
    """``llama-bench -n tokens`` (decode only); with ``leave``, only that much memory is available to it."""
    balloon = None
    if leave is not None:
        balloon = subprocess.Popen([sys.executable, str(ROOT / "benchmarks" / "memory_balloon.py"), "--leave",
                                    str(leave)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        ready = balloon.stdout.readline().strip()
        print(f"balloon {ready}", flush=True)
    try:
        cmd = [str(bin_dir / "llama-bench"), "-m", str(gguf), "-t", "2", "-p", "0", "-n", str(tokens), "-r", "1",
               "-o", "json"]
        print("$ " + " ".join(cmd), flush=True)
        t0 = time.perf_counter()
        r = subprocess.run(cmd, capture_output=True, text=True, check=True)
        rows = json.loads(r.stdout)
        return {"tok_per_s": float(rows[0]["avg_ts"]), "wall_s": time.perf_counter() - t0,
                "available_bytes": leave}
    finally:
        if balloon is not None:
            balloon.stdin.close()
            balloon.wait(timeout=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="turbosparse-mistral-7b", choices=["turbosparse-mistral-7b",
                                                                          "mixtral-8x7b-sparse"])
    ap.add_argument("--layers", type=int, default=None, help="default: the shape's full depth")
    ap.add_argument("--budgets", default="50%", help="comma-separated FFN budgets for xpuc")
    ap.add_argument("--modes", default="naive,full")
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--calib-tokens", type=int, default=1024)
    ap.add_argument("--records", default="auto", choices=["auto", "split", "whole"],
                    help="xpuc pack --records (auto: gate rows apart from up/down rows where it applies)")
    ap.add_argument("--fixed-dtype", default="q4_0", choices=["q4_0", "q8_0", "float16"],
                    help="xpuc pack --fixed-dtype: attention, norms and the rest kept in memory (q4_0: the GGUF's "
                         "own type, so both engines read the same bytes per token)")
    ap.add_argument("--eval", action="store_true", help="also measure the predictor and quality on held-out text")
    ap.add_argument("--work", default=None, help="default: .cache/xpuc/bench-peer/<shape>")
    ap.add_argument("-o", "--output", default=None)
    args = ap.parse_args()
    w = Path(args.work or ROOT / ".cache" / "xpuc" / "bench-peer" / (args.shape + (f"-l{args.layers}"
                                                                                     if args.layers else "")))
    w.mkdir(parents=True, exist_ok=True)
    out = Path(args.output or ROOT / "benchmarks" / "results" / f"peer_offload_{args.shape}.json")
    gguf, art = prepare(args, w)
    bin_dir, info, flags = build_llamacpp(ROOT / ".cache" / "xpuc" / "llama.cpp", gguf)
    print(f"llama.cpp {info}\nextra cmake flags: {' '.join(flags) or 'none'}", flush=True)
    budgets = args.budgets.split(",")
    rounds: list[dict] = []
    for r in range(args.repeats):
        row: dict = {"round": r, "xpuc": {}, "llamacpp_limited": {}}
        for b in budgets:
            row["xpuc"][b] = run_xpuc(art, b, args.modes, args.tokens, w / f"bench-{b}.json")
        row["llamacpp_all_memory"] = run_llamacpp(bin_dir, gguf, args.tokens, None)
        for b in budgets:
            rss = max(m["rss_bytes"] for m in row["xpuc"][b])
            row["llamacpp_limited"][b] = run_llamacpp(bin_dir, gguf, args.tokens, rss)
        rounds.append(row)
    table = summarize(rounds, budgets, args.modes.split(","))
    print(table)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"shape": args.shape, "layers": args.layers, "gguf_bytes": gguf.stat().st_size,
                               "llamacpp_system_info": info, "llamacpp_extra_flags": flags,
                               "records": args.records, "fixed_dtype": args.fixed_dtype, "rounds": rounds,
                               "table": table}, indent=1))
    print(f"wrote {out}")


def summarize(rounds: list[dict], budgets: list[str], modes: list[str]) -> str:
    med = statistics.median
    lines = ["| engine | memory | decode tok/s (median) | × llama.cpp, same memory | × llama.cpp, all memory |",
             "|---|---|---|---|---|"]
    allmem = med(r["llamacpp_all_memory"]["tok_per_s"] for r in rounds)
    lines.append(f"| llama.cpp (mmap) | all | {allmem:.2f} | | 1.00 |")
    for b in budgets:
        lim = med(r["llamacpp_limited"][b]["tok_per_s"] for r in rounds)
        avail = med(r["llamacpp_limited"][b]["available_bytes"] for r in rounds) / 2**30
        lines.append(f"| llama.cpp (mmap) | {avail:.1f} GiB available | {lim:.2f} | 1.00 | {lim / allmem:.2f} |")
        for m in modes:
            v = med(next(x["tok_per_s"] for x in r["xpuc"][b] if x["mode"] == m) for r in rounds)
            rss = med(next(x["rss_bytes"] for x in r["xpuc"][b] if x["mode"] == m) for r in rounds) / 2**30
            lines.append(f"| xpuc {m}, FFN budget {b} | {rss:.1f} GiB peak RSS | {v:.2f} | {v / lim:.2f} | "
                         f"{v / allmem:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
