"""A GGUF model as shipped (its own block formats kept) against llama.cpp on the same file, in one run.

    python benchmarks/gguf_formats.py --gguf qwen2.5-coder-0.5b-q4_k_m.gguf      # see shared real-models list
    python benchmarks/gguf_formats.py                                             # the bundled SmolLM2 GGUF

For each of ``--configs`` (``keep``: `xpuc compile --quantize keep`, every matrix as the file stores it;
``fp16``: the matrices dequantized to float16; ``q4_1`` / ``q4_0`` / ``q8_0``: re-quantized) the model is
compiled once (cached under ``--work``; rebuilt when xpuc's sources are newer), then ``--repeats`` interleaved
rounds run, each engine in its own process: ``xpuc bench ART -p P -n N -r R`` and llama.cpp's
``llama-bench -p P -n N -r R -t THREADS`` (built natively from the llama-cpp-python sdist by
``benchmarks/llamacpp_build.py``; its ``system_info`` line is printed). With ``--ppl``, ``xpuc perplexity`` and
``llama-perplexity`` score the same held-out text (``--ctx`` tokens a chunk, the second half scored).
Writes ``benchmarks/results/gguf_formats_<model>.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from llamacpp_build import build_llamacpp  # noqa: E402
from offload import EVAL, ROOT  # noqa: E402

XPUC = [sys.executable, "-m", "xpuc.compiler.cli"]


def _stale(manifest: Path) -> bool:
    """Whether xpuc's sources changed since the artifact was compiled (a cached artifact is rebuilt then)."""
    sources = [f for d in ("compiler", "schedules", "runtime", "targets") for f in (ROOT / d).rglob("*.py")]
    return not manifest.is_file() or max(f.stat().st_mtime for f in sources) > manifest.stat().st_mtime


def compile_art(gguf: Path, config: str, work: Path) -> Path:
    art = work / f"{gguf.stem}-{config}"
    if _stale(art / "manifest.json"):
        q = [] if config == "fp16" else ["--quantize", config]
        subprocess.run([*XPUC, "compile", str(gguf), *q, "-o", str(art), "--force"], check=True)
    return art


def xpuc_bench(art: Path, p: int, n: int, r: int, out: Path) -> dict:
    subprocess.run([*XPUC, "bench", str(art), "-p", str(p), "-n", str(n), "-r", str(r), "-o", str(out)],
                   check=True, stdout=subprocess.DEVNULL)
    return {t["test"]: t["avg_ts"] for t in json.loads(out.read_text())["tests"]}


def llama_bench(bin_dir: Path, gguf: Path, p: int, n: int, r: int, threads: int) -> dict:
    cmd = [str(bin_dir / "llama-bench"), "-m", str(gguf), "-t", str(threads), "-p", str(p), "-n", str(n),
           "-r", str(r), "-o", "json"]
    rows = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    return {(f"pp{x['n_prompt']}" if x["n_prompt"] else f"tg{x['n_gen']}"): x["avg_ts"] for x in rows}


def xpuc_ppl(art: Path, text: str, ctx: int, chunks: int) -> float:
    r = subprocess.run([*XPUC, "perplexity", str(art), "--text", text, "--ctx", str(ctx), "--chunks", str(chunks),
                        "--json", "--quiet"], check=True, capture_output=True, text=True)
    return float(json.loads(r.stdout)["ppl"])


def llama_ppl(bin_dir: Path, gguf: Path, text: str, ctx: int, chunks: int, threads: int) -> float:
    r = subprocess.run([str(bin_dir / "llama-perplexity"), "-m", str(gguf), "-f", text, "-c", str(ctx),
                        "--chunks", str(chunks), "-t", str(threads)], capture_output=True, text=True)
    m = re.search(r"Final estimate: PPL = ([0-9.]+)", r.stdout + r.stderr)
    if not m:
        raise SystemExit(f"llama-perplexity gave no estimate:\n{(r.stdout + r.stderr)[-2000:]}")
    return float(m.group(1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", default=None, help="default: the bundled SmolLM2-135M Q4_1 GGUF")
    ap.add_argument("--configs", default="keep,fp16,q4_1")
    ap.add_argument("-p", type=int, default=128, help="prompt tokens (ppP)")
    ap.add_argument("-n", type=int, default=64, help="generated tokens (tgN)")
    ap.add_argument("-r", type=int, default=3, help="repetitions per test")
    ap.add_argument("--repeats", type=int, default=2, help="interleaved rounds")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--ppl", action="store_true", help="also perplexity on --text")
    ap.add_argument("--text", default=EVAL)
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--chunks", type=int, default=4)
    ap.add_argument("--work", default=str(ROOT / ".cache" / "xpuc" / "bench-gguf"))
    ap.add_argument("-o", "--output", default=None)
    args = ap.parse_args()
    if args.gguf is None:
        from xpuc.compiler.zoo import resolve_model

        args.gguf = resolve_model("smollm2-135m")
    gguf, work = Path(args.gguf).resolve(), Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    configs = args.configs.split(",")
    arts = {c: compile_art(gguf, c, work) for c in configs}
    bin_dir, info, flags = build_llamacpp(ROOT / ".cache" / "xpuc" / "llama.cpp", gguf)
    print(f"llama.cpp {info}\nextra cmake flags: {' '.join(flags) or 'none'}", flush=True)
    rounds = []
    for r in range(args.repeats):
        row = {"xpuc": {}}
        for c in configs:
            row["xpuc"][c] = xpuc_bench(arts[c], args.p, args.n, args.r, work / f"bench-{c}.json")
            print(f"round {r}: xpuc {c}: {row['xpuc'][c]}", flush=True)
        row["llamacpp"] = llama_bench(bin_dir, gguf, args.p, args.n, args.r, args.threads)
        print(f"round {r}: llama.cpp: {row['llamacpp']}", flush=True)
        rounds.append(row)
    ppl = {}
    if args.ppl:
        ppl = {c: xpuc_ppl(arts[c], args.text, args.ctx, args.chunks) for c in configs}
        ppl["llamacpp"] = llama_ppl(bin_dir, gguf, args.text, args.ctx, args.chunks, args.threads)
    sizes = {c: sum(f.stat().st_size for f in arts[c].iterdir()) for c in configs}
    med = statistics.median
    tests = [f"pp{args.p}", f"tg{args.n}"]
    lines = ["| engine | weights | artifact MiB | " + " | ".join(f"{t} t/s" for t in tests)
             + " | × llama.cpp (tg) |" + (" PPL |" if ppl else ""), "|---|---|---|" + "---|" * (len(tests) + 1)
             + ("---|" if ppl else "")]
    lc = {t: med(x["llamacpp"][t] for x in rounds) for t in tests}
    lines.append(f"| llama.cpp | as the file stores them | {gguf.stat().st_size / 2**20:.0f} | "
                 + " | ".join(f"{lc[t]:.1f}" for t in tests) + " | 1.00 |"
                 + (f" {ppl['llamacpp']:.3f} |" if ppl else ""))
    for c in configs:
        v = {t: med(x["xpuc"][c][t] for x in rounds) for t in tests}
        lines.append(f"| xpuc | {c} | {sizes[c] / 2**20:.0f} | " + " | ".join(f"{v[t]:.1f}" for t in tests)
                     + f" | {v[tests[1]] / lc[tests[1]]:.2f} |" + (f" {ppl[c]:.3f} |" if ppl else ""))
    table = "\n".join(lines)
    print(table)
    out = Path(args.output or ROOT / "benchmarks" / "results" / f"gguf_formats_{gguf.stem}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"gguf": str(gguf), "llamacpp_system_info": info, "llamacpp_extra_flags": flags,
                               "threads": args.threads, "rounds": rounds, "perplexity": ppl, "table": table},
                              indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
