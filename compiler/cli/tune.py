"""CLI commands of the tuning jobs: ``tune``, ``tune merge``, ``rpc-tracker``, ``rpc-server``."""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

from xpuc.compiler.cli.args import POSITIVE, SECONDS, int_in
from xpuc.compiler.frontend_onnx import import_onnx
from xpuc.compiler.frontends import load_model
from xpuc.compiler.onnx_prepare import parse_input_shapes, prepare_graph
from xpuc.compiler.tuning.rpc import parse_address, run_tracker
from xpuc.compiler.tuning.sparse_tuning import as_dicts, best_records, tune_sparse
from xpuc.compiler.zoo import resolve_model
from xpuc.runtime.errors import XpucError
from xpuc.runtime.progress import Steps
from xpuc.runtime.rpc_serve import serve
from xpuc.targets.profile import load_profile

PORT = int_in(1, 65535)


def cmd_tune(args: argparse.Namespace) -> int:
    if args.source[0] == "merge":
        return _merge(args)
    if len(args.source) != 1:
        raise XpucError("tune takes one MODEL, ONNX file or artifact (or: tune merge A B … -o OUT)")
    if not args.db:
        raise XpucError("tune needs --db DIR (the tuning database to create or resume)")
    if args.sparse:
        return _tune_sparse(args)
    from xpuc.compiler.tuning.tune import make_builder, tune_workloads
    from xpuc.compiler.tuning.workloads import extract_workloads, graph_from_source, parse_buckets
    from xpuc.compiler.tuning_db import TuningDatabase

    buckets = parse_buckets(args.buckets)
    profile = load_profile(args.device)
    target = profile.cpu_target()
    runner = None
    if args.rpc_tracker:
        from xpuc.compiler.tuning.rpc import check_tracker, make_rpc_runner, parse_address

        host, port = parse_address(args.rpc_tracker)
        check_tracker(host, port, args.rpc_key, timeout=args.rpc_timeout, wait_free=args.rpc_timeout)
        runner = make_rpc_runner(host, port, args.rpc_key, timeout_s=args.rpc_timeout)
    elif profile.mtriple.split("-")[0] not in ("", _host_arch()) or "android" in profile.mtriple:
        raise XpucError(f"device '{profile.name}' ({profile.mtriple}) cannot run kernels here; measure on it with "
                        "--rpc-tracker HOST:PORT --rpc-key KEY")
    if not profile.toolchain().available():
        raise XpucError(f"toolchain for {profile.mtriple} not found ({profile.toolchain().compiler})")

    is_onnx = str(args.source[0]).endswith(".onnx")
    if (args.input_shape or args.no_simplify) and not is_onnx:
        raise XpucError("--input-shape and --no-simplify apply to ONNX graphs (xpuc tune model.onnx ...)")
    steps = Steps(3, args.quiet)
    steps.start(f"reading {args.source[0]}")
    proto, what = graph_from_source(resolve_model(args.source[0]) if not is_onnx else args.source[0])
    if is_onnx:  # prepared as `xpuc compile` prepares it, so that the tuned kernels are the compiled ones
        proto, _ = prepare_graph(proto, parse_input_shapes(args.input_shape), str(args.source[0]),
                                 not args.no_simplify)
    mod = import_onnx(proto, str(args.source[0]))
    steps.done(what)
    steps.start(f"extracting workloads at {','.join(map(str, buckets))} tokens")
    workloads = extract_workloads(mod, target, buckets)
    if args.only:
        workloads = [w for w in workloads if args.only in w.name]
    if not workloads:
        raise XpucError("no tunable workloads" + (f" match --only {args.only}" if args.only else ""))
    db = TuningDatabase(args.db, create=True, target=target)
    src = str(Path(args.source[0]).resolve()) if Path(args.source[0]).exists() else str(args.source[0])
    if src not in db.index.sources:
        db.index.sources.append(src)
        db.save_index()
    steps.done(f"{len(workloads)} workloads; database {db.path} has {db.n_records} records")
    steps.start(f"tuning ({args.trials} trials per workload, XGBoost cost model"
                + (f", devices '{args.rpc_key}' via {args.rpc_tracker}" if args.rpc_tracker else "") + ")")
    if not args.quiet:
        print(file=sys.stderr)
    report = tune_workloads(workloads, target, db, args.trials, runner=runner,
                            builder=make_builder(target, timeout_s=args.build_timeout), progress=not args.quiet,
                            trials_per_iter=args.trials_per_iter)
    rows = [{"workload": r.key, "trials": r.trials_before + r.trials_new, "new": r.trials_new,
             "best_us": r.best_us, "default_us": r.default_us, "speedup": r.speedup} for r in report.results]
    if args.json:
        print(json.dumps({"database": str(db.path), "interrupted": report.interrupted, "seconds": report.seconds,
                          "workloads": rows}, indent=1))
    else:
        print(f"{'workload':56s} {'trials':>6s} {'best us':>10s} {'default us':>10s} {'speedup':>7s}")
        for r in rows:
            speed = f"{r['speedup']:.2f}x" if r["speedup"] else "-"
            print(f"{r['workload'][:56]:56s} {r['trials']:6d} {_fmt(r['best_us']):>10s} {_fmt(r['default_us']):>10s} "
                  f"{speed:>7s}")
        print(f"{db.path}: {len(rows)} workloads in {report.seconds:.0f} s")
    if report.interrupted:
        print(f"xpuc: interrupted; every measured record is kept in {db.path} — rerun the same command to resume",
              file=sys.stderr)
        return 130
    return 0


def _tune_sparse(args: argparse.Namespace) -> int:
    """``xpuc tune MODEL --sparse``: the sparse FFN kernels' knobs for the model's FFN shape (measured here)."""
    from xpuc.compiler.tuning_db import TuningDatabase

    if args.rpc_tracker:
        raise XpucError("--sparse measures on this machine only (the sparse kernels are not meta_schedule tasks)")
    if str(args.source[0]).endswith(".onnx"):
        raise XpucError("--sparse tunes a model's FFN kernels; give a model, not an ONNX graph")
    try:
        sparsities = tuple(sorted({float(t) for t in args.sparsity.split(",")}))
    except ValueError:
        raise XpucError(f"--sparsity must be comma-separated fractions, got '{args.sparsity}'") from None
    if not sparsities or any(not 0.0 <= s < 1.0 for s in sparsities):
        raise XpucError("--sparsity values must be in [0, 1)")
    cfg = load_model(resolve_model(args.source[0]), with_tokenizer=False).config
    kind = {"swiglu": "swiglu", "geglu": "swiglu"}.get(cfg.ffn_kind, cfg.ffn_kind)
    target = load_profile(args.device).cpu_target()
    db = TuningDatabase(args.db, create=True, target=target)
    new = tune_sparse(kind, cfg.hidden_size, cfg.intermediate_size, args.weight_dtype, sparsities, args.trials,
                      progress=not args.quiet, prior=db.index.sparse)
    db.index.sparse += as_dicts(new)
    db.save_index()
    best = [b for b in best_records(db.index.sparse)
            if (b["d_model"], b["d_ff"], b["dtype"]) == (cfg.hidden_size, cfg.intermediate_size, args.weight_dtype)]
    if args.json:
        print(json.dumps({"database": str(db.path), "new": as_dicts(new), "best": best}, indent=1))
    else:
        for b in sorted(best, key=lambda b: b["sparsity"]):
            print(f"sparsity {b['sparsity']:.2f}: cluster {b['cluster']}, {b['threads']} threads, {b['mode']}: "
                  f"{b['us']:.1f} us per FFN call")
        print(f"{db.path}: {len(new)} new measurements, {len(db.index.sparse)} sparse-kernel records")
    return 0


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def _host_arch() -> str:

    return platform.machine()


def _merge(args: argparse.Namespace) -> int:
    from xpuc.compiler.tuning_db import merge_databases

    if not args.output:
        raise XpucError("tune merge needs -o OUT")
    db = merge_databases(args.source[1:], args.output)
    print(db.summary())
    return 0


def cmd_rpc_tracker(args: argparse.Namespace) -> int:

    run_tracker(args.host, args.port, args.port_end)
    return 0


def cmd_rpc_server(args: argparse.Namespace) -> int:

    tracker = parse_address(args.tracker, "--tracker") if args.tracker else None
    if args.emulate:
        from xpuc.compiler.tuning.rpc import start_emulated_server

        if tracker is None:
            raise XpucError("--emulate needs --tracker HOST:PORT")
        server = start_emulated_server(tracker, args.key, args.host, args.port)
        print(f"rpc-server: emulated aarch64 serving on {server.address[0]}:{server.address[1]} key '{args.key}'",
              flush=True)
        try:
            server.proc.wait()
        except KeyboardInterrupt:
            pass
        finally:
            server.stop()
        return 0

    try:
        serve(tracker, args.key, args.host, args.port, args.port + 100, args.custom_addr, args.silent)
    except KeyboardInterrupt:
        pass
    return 0


def add_parsers(sub) -> None:
    p = sub.add_parser("tune", help="tune the prefill kernels of a model / ONNX graph into a tuning database",
                       description="Tune with meta_schedule (XGBoost cost model); resumable. "
                                   "Also: `xpuc tune merge A B … -o OUT`.")
    p.add_argument("source", nargs="+", help="model, ONNX file or artifact directory (or: merge DB DB …)")
    p.add_argument("--device", default="host", help="device profile whose CPU is tuned (default: host)")
    p.add_argument("--db", default=None, help="tuning database directory (created, or resumed when it exists)")
    p.add_argument("--trials", type=POSITIVE, default=64, help="measured candidates per workload in total (default 64)")
    p.add_argument("--trials-per-iter", type=POSITIVE, default=16, help="candidates per search round (default 16)")
    p.add_argument("--buckets", default="16,64,256,512", help="sequence lengths to tune for (default 16,64,256,512)")
    p.add_argument("--only", default=None, help="tune only workloads whose name contains this text")
    p.add_argument("--input-shape", metavar="NAME=DIMS", action="append", default=None,
                   help="ONNX: fix an input's dims as for `xpuc compile` (repeatable; give the same to both)")
    p.add_argument("--no-simplify", action="store_true",
                   help="ONNX: tune the graph as is (no onnxslim), as `xpuc compile --no-simplify` builds it")
    p.add_argument("--rpc-tracker", default=None, metavar="HOST:PORT", help="measure on devices of this tracker")
    p.add_argument("--rpc-key", default="xpuc", help="device key at the tracker (default xpuc)")
    p.add_argument("--rpc-timeout", type=SECONDS, default=60.0, help="seconds to wait for the tracker / a device")
    p.add_argument("--build-timeout", type=SECONDS, default=60.0, help="seconds per candidate build")
    p.add_argument("--sparse", action="store_true",
                   help="tune the sparse FFN kernels' knobs (cluster size, threads, fused/split) of a model instead")
    p.add_argument("--sparsity", default="0.9,0.7", help="--sparse: share of inactive neurons to tune at")
    p.add_argument("--weight-dtype", default="q4_0", choices=["float32", "float16", "q4_0", "q4_1"],
                   help="--sparse: record dtype (default q4_0)")
    p.add_argument("-o", "--output", default=None, help="merge: the new database directory")
    p.add_argument("--json", action="store_true")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(fn=cmd_tune)

    p = sub.add_parser("rpc-tracker", help="run a TVM RPC tracker (device farm)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; 0.0.0.0 for a LAN)")
    p.add_argument("--port", type=PORT, default=9190)
    p.add_argument("--port-end", type=PORT, default=9299)
    p.set_defaults(fn=cmd_rpc_tracker)

    p = sub.add_parser("rpc-server", help="serve this device (or an emulated aarch64 one) to a tracker")
    p.add_argument("--tracker", default=None, metavar="HOST:PORT")
    p.add_argument("--key", default="xpuc", help="device key (default xpuc)")
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=PORT, default=9090)
    p.add_argument("--custom-addr", default=None, help="address to report to the tracker")
    p.add_argument("--emulate", choices=["aarch64"], default=None,
                   help="serve an aarch64 device emulated with QEMU user mode")
    p.add_argument("--silent", action="store_true")
    p.set_defaults(fn=cmd_rpc_server)
