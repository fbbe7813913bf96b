"""Offloaded decoding of a TurboSparse-Mistral-7B-shaped dReLU model (or a Mixtral-8x7B-shaped dReLU MoE):
naive vs LLM-in-a-flash vs xpuc.

Generates the model (``xpuc synth --shape turbosparse-mistral-7b --layers N``: the 7B layer shapes, fewer
layers so that it fits this machine's time budget), profiles it on a license text, trains the predictor,
plans for ``--device`` (default: this machine, with the disk curve from ``xpuc targets --measure-flash``,
measured first when there is none) and ``--budget`` of the FFN in memory (int4 q4_0 records, one neuron per
record: 6912 bytes), packs it (``--fixed-dtype``: the in-memory attention / embedding / LM head, default q8_0)
and runs ``xpuc bench`` over
the modes. Every step is cached under ``--work``.

    python benchmarks/offload.py --layers 4 --budget 50% --tokens 32
    python benchmarks/offload.py --shape mixtral-8x7b-sparse --layers 1 --budget 10% --tokens 16
    python benchmarks/offload.py --budget 50% --records whole,split -o benchmarks/results/offload_7b_split.json

Writes ``benchmarks/results/offload_7b.json`` (``offload_moe.json`` for the MoE) (+ ``.png``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from xpuc.targets.flash_curve import curve_path

ROOT = Path(__file__).resolve().parent.parent
TEXT = "/usr/share/common-licenses/Apache-2.0"
EVAL = "/usr/share/common-licenses/GPL-3"


def xpuc(*args: str) -> None:
    print("$ xpuc " + " ".join(args), flush=True)
    subprocess.run([sys.executable, "-m", "xpuc.compiler.cli", *args], check=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="turbosparse-mistral-7b", choices=["turbosparse-mistral-7b",
                                                                          "mixtral-8x7b-sparse"])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--budget", default="50%")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--modes", default="naive,llmflash,cache,full")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="host",
                    help="device profile to plan for (host: this machine's cores and its measured disk curve, "
                         "`xpuc targets --measure-flash`; oneplus-12: the phone's published UFS 4.0 curve)")
    ap.add_argument("--fixed-dtype", default="q8_0", choices=["float16", "q8_0", "q4_0", "q4_1"])
    ap.add_argument("--records", default="auto",
                    help="xpuc pack --records: split gate rows from up/down rows (auto: where it applies); a "
                         "comma list (e.g. whole,split) packs each and runs them interleaved, round by round")
    ap.add_argument("--dot", default="auto",
                    help="comma-separated dot products of the packed kernels (auto, int8, float32): each is packed and "
                         "run, interleaved")
    ap.add_argument("--work", default=str(ROOT / ".cache" / "xpuc" / "bench-offload"))
    ap.add_argument("-o", "--output", default=None, help="default: benchmarks/results/offload_7b.json / _moe.json")
    args = ap.parse_args()
    moe = args.shape == "mixtral-8x7b-sparse"
    out = args.output or str(ROOT / "benchmarks" / "results" / ("offload_moe.json" if moe else "offload_7b.json"))
    w = Path(args.work) / (f"moe-l{args.layers}" if moe else f"l{args.layers}")
    w.mkdir(parents=True, exist_ok=True)
    if args.device == "host" and not curve_path().is_file():
        (w / "curve-probe.bin").write_bytes(os.urandom(256 << 20))  # a file on the disk the model will live on
        xpuc("targets", "--measure-flash", str(w / "curve-probe.bin"))
        (w / "curve-probe.bin").unlink()
    if not (w / "model").exists():
        xpuc("synth", "--shape", args.shape, "--layers", str(args.layers), "--sparsity", "0.88" if moe else "0.9",
             "--seed", "1", "-o", str(w / "model"))
    if not (w / "pred.safetensors").exists():
        xpuc("profile", str(w / "model"), "--text", TEXT, "--max-tokens", "1024", "--eval-text", EVAL,
             "--max-eval-tokens", "256", "--recall", "0.98", "-o", str(w / "stats.json"),
             "--predictor", str(w / "pred.safetensors"))
    tag = "" if args.device == "oneplus-12" else f"-{args.device}"
    records = args.records.split(",")
    if not set(records) <= {"auto", "split", "whole"}:
        ap.error(f"--records: each of auto, split, whole (got {args.records})")
    plan = w / f"plan{tag}.json"
    if not plan.exists():
        xpuc("plan", str(w / "model"), "--stats", str(w / "stats.json"), "--device", args.device,
             "--memory-budget", "64GiB", "--weight-dtype", "q4_0", "--cluster", "1", "--context", "512",
             "-o", str(plan))
    dots = args.dot.split(",")
    if not set(dots) <= {"auto", "int8", "float32"}:
        ap.error(f"--dot: each of auto, int8, float32 (got {args.dot})")
    arts = {}
    for rec in records:
        for dot in dots:
            name = rec if len(dots) == 1 else f"{rec}/{dot}"
            arts[name] = art = w / (("art" if args.fixed_dtype == "float16" else f"art-{args.fixed_dtype}") + tag
                                    + ("" if rec == "auto" else f"-{rec}") + ("" if dot == "auto" else f"-{dot}"))
            if not art.exists():
                xpuc("pack", str(w / "model"), "--stats", str(w / "stats.json"), "--plan", str(plan),
                     "--predictor", str(w / "pred.safetensors"), "--fixed-dtype", args.fixed_dtype, "--records",
                     rec, "--dot", dot, "-o", str(art))
    if len(arts) == 1:
        xpuc("bench", str(next(iter(arts.values()))), "--budget", args.budget, "--modes", args.modes, "--tokens",
             str(args.tokens), "--repeats", str(args.repeats), "-o", out)
        memory_bound(out)
        return
    compare_records(arts, args, out)


def compare_records(arts: dict, args, out: str) -> None:
    """Each packing's modes, interleaved round by round in this one run (the disk's speed drifts between runs);
    per packing and mode the round with the median speed stands, all speeds kept."""
    rounds: dict[str, list[dict]] = {rec: [] for rec in arts}
    for r in range(args.repeats):
        for rec, art in arts.items():
            part = f"{out}.{rec.replace('/', '-')}.{r}.json"
            xpuc("bench", str(art), "--budget", args.budget, "--modes", args.modes, "--tokens", str(args.tokens),
                 "--repeats", "1", "-o", part)
            rounds[rec].append(json.loads(Path(part).read_text()))
            Path(part).unlink()
            Path(part).with_suffix(".png").unlink(missing_ok=True)
    report = {"budget": args.budget, "tokens": args.tokens, "repeats": args.repeats, "records": {}}
    print(f"{'packing':<8} {'mode':<9} {'tok/s (runs)':<28} {'MiB read/tok':>12} {'req/tok':>8} {'fired MiB':>9}")
    for rec, reps in rounds.items():
        rows = []
        for mode in args.modes.split(","):
            runs = sorted((m for rep in reps for m in rep["modes"] if m["mode"] == mode), key=lambda m: m["tok_per_s"])
            row = dict(runs[len(runs) // 2])
            row["tok_per_s_runs"] = [m["tok_per_s"] for m in runs]
            rows.append(row)
            print(f"{rec:<8} {mode:<9} {', '.join(f'{v:.2f}' for v in row['tok_per_s_runs']):<28} "
                  f"{row['bytes_read_per_token'] / 2**20:>12.1f} {row['requests_per_token']:>8.0f} "
                  f"{row.get('fired_bytes_per_token', 0) / 2**20:>9.1f}")
        report["records"][rec] = {"artifact": str(arts[rec]), "modes": rows}
    Path(out).write_text(json.dumps(report))
    for rec in arts:  # each packing's share of the memory-bandwidth bound, one bandwidth measurement each
        part = Path(f"{out}.{rec.replace('/', '-')}.json")
        part.write_text(json.dumps({"modes": report["records"][rec]["modes"]}))
        print(f"{rec}:")
        memory_bound(str(part))
        report["records"][rec]["modes"] = json.loads(part.read_text())["modes"]
        part.unlink()
    Path(out).write_text(json.dumps(report))
    print(f"wrote {out}")


def memory_bound(report_file: str) -> None:
    """Each mode's decode speed as a share of the memory-bandwidth bound: the bytes a token touches (weights,
    the FFN clusters computed, the KV cache) over this machine's read bandwidth, measured now."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bandwidth import measure_read_bandwidth

    report = json.loads(Path(report_file).read_text())
    gbps = measure_read_bandwidth()
    report["memory_bandwidth_gbps"] = round(gbps, 2)
    print(f"memory read bandwidth (same run): {gbps:.1f} GB/s")
    for r in report["modes"]:
        bound = gbps * 1e9 / r["touched_bytes_per_token"]
        r["memory_bound_tok_per_s"], r["share_of_memory_bound"] = round(bound, 2), round(r["tok_per_s"] / bound, 3)
        print(f"{r['mode']:<9} touches {r['touched_bytes_per_token'] / 2**20:7.1f} MiB/token -> bound "
              f"{bound:6.2f} tok/s; measured {r['tok_per_s']:6.2f} = {100 * r['tok_per_s'] / bound:5.1f} % of it")
    Path(report_file).write_text(json.dumps(report))


if __name__ == "__main__":
    main()
