"""Soak: many short generations in one process on a packed model; RSS and open file descriptors must stay flat.

    python benchmarks/offload_soak.py --generations 1000

Generates, profiles, plans and packs a tiny dReLU model (cached under ``--work``), then runs ``--generations``
generations of 4 prompt tokens + 4 new tokens in ``full`` mode with 30 % of the FFN in memory, sampling RSS and
the descriptor count every 50 generations. Writes ``benchmarks/results/offload_soak.json``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def packed_tiny(work: Path) -> Path:
    from xpuc.compiler.frontends import load_model
    from xpuc.compiler.offload_pack import pack_offload
    from xpuc.compiler.planner import plan_neurons
    from xpuc.compiler.predictor import collect_pairs, train_predictor
    from xpuc.compiler.profiler import profile_model
    from xpuc.compiler.synth import synthesize
    from xpuc.runtime.tokenizer import XpucTokenizer
    from xpuc.targets.profile import load_profile

    art = work / "art"
    if art.exists():
        return art
    work.mkdir(parents=True, exist_ok=True)
    if not (work / "model").exists():
        synthesize("tiny", 0.9, 11, work / "model")
    spec = load_model(str(work / "model"))
    text = Path("/usr/share/common-licenses/Apache-2.0").read_text()
    ids = XpucTokenizer.from_source(spec.tokenizer).encode(text)[:1024]
    stats = profile_model(spec, ids)
    stats.save(work / "stats.json")
    train_predictor(spec, collect_pairs(spec, ids, stats.thresholds)).save(work / "pred.safetensors")
    plan_neurons(spec.config, stats, load_profile("oneplus-12"), 4 << 20, "q4_0", 1).save(work / "plan.json")
    return pack_offload(str(work / "model"), str(work / "stats.json"), str(work / "plan.json"),
                        str(work / "pred.safetensors"), art, quiet=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--generations", type=int, default=1000)
    ap.add_argument("--work", default=str(ROOT / ".cache" / "xpuc" / "bench-soak"))
    ap.add_argument("-o", "--output", default=str(ROOT / "benchmarks" / "results" / "offload_soak.json"))
    args = ap.parse_args()
    import psutil

    from xpuc.runtime.formats.jsonfile import write_json_atomic
    from xpuc.runtime.offload import OffloadModel
    from xpuc.runtime.threads import configure_tvm_threads

    configure_tvm_threads(None)
    art = packed_tiny(Path(args.work))
    proc = psutil.Process()
    samples = []
    t0 = time.perf_counter()
    with OffloadModel(art, "full", 0.3) as m:
        m.generate([1, 2, 3, 4], 4)
        for g in range(args.generations):
            m.generate([(g * 7) % 500 + 1, (g * 13) % 500 + 1, 5, 9], 4)
            if g % 50 == 0 or g == args.generations - 1:
                samples.append({"generation": g, "rss_mib": proc.memory_info().rss / 2**20, "fds": proc.num_fds(),
                                "threads": proc.num_threads()})
                print(f"generation {g}: RSS {samples[-1]['rss_mib']:.1f} MiB, {samples[-1]['fds']} fds, "
                      f"{samples[-1]['threads']} threads", flush=True)
    after = {"fds": proc.num_fds(), "threads": proc.num_threads()}
    first, last = samples[0], samples[-1]
    report = {"generations": args.generations, "seconds": time.perf_counter() - t0, "samples": samples,
              "rss_growth_mib": last["rss_mib"] - first["rss_mib"], "fd_growth": last["fds"] - first["fds"],
              "after_close": after}
    write_json_atomic(args.output, report)
    print(f"RSS growth {report['rss_growth_mib']:.1f} MiB, fd growth {report['fd_growth']}, "
          f"after close: {after['fds']} fds, {after['threads']} threads; wrote {args.output}")


if __name__ == "__main__":
    main()
