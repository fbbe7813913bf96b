"""``xpuc run``: one command for every artifact kind, one generation loop for every engine.

A compiled decoder (kind ``llm``, on the CPU or split GPU/NPU prefill -> CPU decode) and a packed model (kind
``packed``, FFN on flash) both go through :func:`xpuc.runtime.generation.generate`; only the engine and the
metrics each reports differ. An ONNX graph artifact (kind ``graph``) is called once with ``--inputs``.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

from xpuc.compiler.cli.args import NON_NEGATIVE, POSITIVE, float_in
from xpuc.runtime.artifact import read_manifest
from xpuc.runtime.budget import parse_budget
from xpuc.runtime.errors import XpucError
from xpuc.runtime.generation import generate
from xpuc.runtime.graph import GraphRunner, load_npz, save_npz
from xpuc.runtime.offload import MODES, OffloadModel
from xpuc.runtime.sampler import SamplingParams
from xpuc.runtime.tokenizer import XpucTokenizer


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def parse_modes(text: str) -> list[str]:

    modes = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise XpucError(f"unknown mode(s) {', '.join(bad) or '(none)'} (known: {', '.join(MODES)})")
    return modes


def max_context(args: argparse.Namespace, model_context: int) -> int:
    """--max-context, or 2048 capped at the model's context length; more than the model's is refused."""
    if args.max_context is None:
        return min(2048, int(model_context))
    if args.max_context > model_context:
        raise XpucError(f"--max-context {args.max_context} exceeds the model's context length of {model_context} "
                        "tokens")
    return args.max_context


def cmd_run(args: argparse.Namespace) -> int:

    manifest = read_manifest(Path(args.artifact))
    if manifest.kind == "graph":
        return _run_graph(args)
    if args.prompt is None:
        raise XpucError("--prompt is required")
    context = max_context(args, manifest.config.get("context_length", 2048))
    if manifest.kind == "packed":
        return _run_packed(args, context)
    return _run_compiled(args, context)


def _run_compiled(args: argparse.Namespace, context: int) -> int:
    from xpuc.runtime.engine import Engine

    engine = Engine(args.artifact, max_context=context)
    if engine.prefill_note and not args.json:
        print(f"xpuc: prefill on the CPU ({engine.prefill_note})", file=sys.stderr)
    ids = engine.encode_prompt(args.prompt, chat=args.chat, system=args.system)
    res = _generate(args, engine.session, ids, engine.tokenizer, engine.config.vocab_size)
    res.prefill_on = engine.prefill_on
    stats = _common_stats(res)
    stats.update(weights_mib=round(engine.weight_bytes / 2**20, 1), prefill_on=res.prefill_on)
    where = f" on {res.prefill_on}" if res.prefill_on != "cpu" else ""
    if res.handoff is not None:
        h = res.handoff
        stats["kv_handoff"] = {"tokens": h.tokens, "bytes": h.bytes, "seconds": round(h.seconds, 4)}
        where += f", KV cache handed to the CPU ({h.bytes / 2**20:.1f} MiB, {h.seconds * 1e3:.1f} ms)"
    summary = (f"prefill{where}: {stats['prompt_tokens']} tokens, {stats['prefill_tok_s']:.1f} tok/s | "
               f"decode: {stats['generated_tokens']} tokens, {stats['decode_tok_s']:.1f} tok/s | "
               f"peak RSS {stats['peak_rss_mib']:.0f} MiB (weights {stats['weights_mib']:.0f} MiB)")
    return _report(args, res, stats, summary)


def _run_packed(args: argparse.Namespace, context: int) -> int:

    art = Path(args.artifact)
    if not (art / "tokenizer.json").is_file():
        raise XpucError(f"{art}: packed model has no tokenizer")
    share, total = parse_budget(args.budget) if args.budget else (None, None)
    if total is not None:
        raise XpucError("xpuc run takes --budget as a share of the FFN (e.g. 50%)")
    tok = XpucTokenizer.from_artifact_dir(art)
    ids = tok.encode(tok.apply_chat_template(args.prompt, args.system) if args.chat else args.prompt)
    with OffloadModel(art, parse_modes(args.mode)[0], share, context=context) as m:

        def after_prefill(seconds: float) -> None:  # decode metrics exclude the prompt's reads
            m.reader.reset_counters()
            if m.cache is not None:
                m.cache.reset_counters()
            if not args.json:
                print(f"xpuc: prompt of {len(ids)} tokens prefilled in {seconds:.2f} s; generating (Ctrl-C stops)",
                      file=sys.stderr, flush=True)

        res = _generate(args, m, ids, tok, m.config.vocab_size, after_prefill)
        steps = max(len(res.tokens) - 1, 1)
        stats = _common_stats(res)
        stats.update(mode=m.mode, ffn_in_memory=round(m.ffn_fraction, 3),
                     flash_mib_per_token=round(m.reader.metrics()["bytes_read"] / steps / 2**20, 2),
                     cache_hit_rate=round(m.cache.hit_rate(), 3) if m.cache is not None else None,
                     accounted_mib=round(m.accounted_bytes()["total"] / 2**20, 1), direct_io=m.reader.direct)
    summary = (f"{stats['mode']}: TTFT {stats['time_to_first_token_s']:.2f} s | decode "
               f"{stats['decode_tok_s']:.2f} tok/s | flash {stats['flash_mib_per_token']:.1f} MiB/token | hit rate "
               f"{stats['cache_hit_rate']} | memory accounted {stats['accounted_mib']:.0f} MiB, peak RSS "
               f"{stats['peak_rss_mib']:.0f} MiB")
    return _report(args, res, stats, summary)


def _generate(args: argparse.Namespace, session, ids: list[int], tokenizer, vocab_size: int, after_prefill=None):
    """The one generation loop, with the CLI's sampling flags and streaming (Ctrl-C: main prints, exit 130)."""

    streaming = not (args.json or args.no_stream) and tokenizer is not None
    t0 = time.perf_counter()

    def on_token(_tok: int) -> None:
        nonlocal after_prefill
        if after_prefill is not None:
            after_prefill(time.perf_counter() - t0)
            after_prefill = None

    def on_text(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    res = generate(session, ids, args.max_tokens, SamplingParams(args.temperature, args.top_p, args.seed),
                   tokenizer.eos_token_ids if tokenizer is not None else (), tokenizer, vocab_size,
                   on_text=on_text if streaming else None, on_token=on_token)
    return res


def _common_stats(res) -> dict:
    return {"prompt_tokens": len(res.prompt_tokens), "generated_tokens": len(res.tokens),
            "prefill_tok_s": round(res.prefill_tok_s, 2), "decode_tok_s": round(res.decode_tok_s, 2),
            "time_to_first_token_s": round(res.prefill_s, 4), "stop": res.stop_reason,
            "peak_rss_mib": round(peak_rss_mib(), 1)}


def _report(args: argparse.Namespace, res, stats: dict, summary: str) -> int:
    if args.json:
        print(json.dumps({"text": res.text, "tokens": res.tokens, **stats}, indent=1))
        return 0
    sys.stdout.write(res.pending_text)  # what streaming has not printed (all of it with --no-stream)
    print()
    sys.stdout.flush()
    print(summary, file=sys.stderr)
    return 0


def _run_graph(args: argparse.Namespace) -> int:

    runner = GraphRunner(args.artifact)
    if not args.inputs:
        raise XpucError(f"this artifact is an ONNX graph: pass --inputs FILE.npz with arrays {runner.inputs}")
    data = load_npz(args.inputs)
    missing = [n for n in runner.inputs if n not in data]
    if missing:
        raise XpucError(f"{args.inputs}: missing inputs {missing}")
    outs = runner(*[data[n] for n in runner.inputs])
    names = [o["name"] for o in runner.manifest.io.get("outputs", [])] or [f"output{i}" for i in range(len(outs))]
    if args.output:
        save_npz(args.output, dict(zip(names, outs, strict=False)))
    for n, o in zip(names, outs, strict=False):
        print(f"{n}: shape {list(o.shape)} {o.dtype}")
    return 0


def add_parsers(sub) -> None:
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

