"""``xpuc profile``, ``plan``, ``pack`` (and ``bench`` of a packed model): a model larger than memory, from
calibration text to a packed model and its side-by-side benchmark."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import numpy as np

from xpuc.compiler.cli.args import POSITIVE, float_in, int_at_least
from xpuc.compiler.cli.run import parse_modes
from xpuc.compiler.coactivation import coactivation_order
from xpuc.compiler.frontends import load_model
from xpuc.compiler.offload_bench import run_bench
from xpuc.compiler.offload_pack import pack_offload
from xpuc.compiler.planner import plan_neurons
from xpuc.compiler.profiler import profile_model, read_text_files
from xpuc.compiler.zoo import resolve_model
from xpuc.runtime.artifact import check_output_file
from xpuc.runtime.budget import parse_budget, parse_size
from xpuc.runtime.errors import XpucError
from xpuc.runtime.formats.profile_stats import ProfileStats
from xpuc.runtime.tokenizer import XpucTokenizer
from xpuc.targets.profile import load_profile


def cmd_profile(args: argparse.Namespace) -> int:

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
        from xpuc.runtime.progress import count

        pairs = collect_pairs(spec, ids, stats.thresholds)
        unit = "FFN unit (expert)" if spec.config.is_moe else "layer"
        predictor = train_predictor(spec, pairs, args.recall,
                                    progress=lambda i, n: count(f"training predictor, {unit}", i, n))
        predictor.save(args.predictor)
        print(f"wrote {args.predictor}")
        # the runtime reads what the predictor selects: lay those neurons out by the predictor's co-firing
        stats.coactivation = [coactivation_order(predictor.layers[u].predict(x)) for u, (x, _m) in enumerate(pairs)]
        stats.save(args.output)
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

    check_output_file(args.output)
    spec = load_model(resolve_model(args.model), with_tokenizer=False)
    stats = ProfileStats.load(args.stats)
    profile = load_profile(args.device)
    cluster, tuned = args.cluster, None
    if args.tuning_db:
        from xpuc.compiler.tuning.sparse_tuning import pick_sparse_config

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

    out = pack_offload(args.model, args.stats, args.plan, args.predictor, args.output, args.force, args.quiet,
                       fixed_dtype=args.fixed_dtype, device=args.device, layout=args.layout,
                       records=args.records, dot=args.dot)
    print(f"wrote {out}")
    return 0

def cmd_bench(args: argparse.Namespace) -> int:
    """``xpuc bench PACKED``: the offloading modes side by side (the parser is in :mod:`.measure`)."""

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


def add_parsers(sub) -> None:
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
    p.add_argument("--layout", default="coactivation", choices=["coactivation", "frequency"],
                   help="order of the cold neurons on flash: neurons that fire together side by side (from the "
                        "profile; default) or most frequent first")
    p.add_argument("--records", default="auto", choices=["auto", "split", "whole"],
                   help="split: each neuron's gate row apart from its up/down rows, so that up/down are read only "
                        "for neurons whose gate fired (clusters of one neuron, gated FFNs); whole: one record per "
                        "cluster; auto (default): split where it applies")
    p.add_argument("--dot", default="auto", choices=["auto", "int8", "float32"],
                   help="dot products of the neuron-cluster kernels: int8 (activations quantized to 8-bit blocks, "
                        "AVX-512 VNNI, q4_0 records), float32, or auto (default: int8 where the device has it)")
    p.add_argument("--force", action="store_true", help="replace an existing directory")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(fn=cmd_pack)
