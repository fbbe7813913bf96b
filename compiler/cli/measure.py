"""``xpuc bench`` and ``xpuc perplexity``: speed and quality of any artifact, by llama.cpp's conventions.

``bench`` of a compiled decoder runs llama-bench's ``ppP`` / ``tgN`` tests; ``bench`` of a packed model runs the
offloading modes side by side. ``perplexity`` scores a text with llama-perplexity's method on a compiled, a
sparse (``--ffn-stats``) or a packed model, so that what sparsity and offloading cost is measured, not assumed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from xpuc.compiler.cli.args import POSITIVE, int_at_least
from xpuc.compiler.cli.offload import cmd_bench as bench_packed
from xpuc.compiler.cli.run import parse_modes
from xpuc.compiler.compiled_bench import bench_session, markdown_table
from xpuc.runtime.artifact import check_output_file, read_manifest
from xpuc.runtime.budget import parse_budget
from xpuc.runtime.errors import XpucError
from xpuc.runtime.formats.jsonfile import write_json_atomic
from xpuc.runtime.offload import OffloadModel
from xpuc.runtime.perplexity import perplexity
from xpuc.runtime.progress import count, end_open_line
from xpuc.runtime.threads import configure_tvm_threads
from xpuc.runtime.tokenizer import XpucTokenizer


def cmd_bench(args: argparse.Namespace) -> int:

    kind = read_manifest(Path(args.artifact)).kind
    if kind == "packed":
        args.output = args.output or "bench.json"
        return bench_packed(args)
    if kind != "llm":
        raise XpucError(f"{args.artifact}: xpuc bench measures language models (this is a '{kind}' artifact)")
    from xpuc.runtime.engine import Engine

    if args.output:
        check_output_file(args.output)
    if args.n_prompt == 0 and args.n_gen == 0:
        raise XpucError("nothing to measure: -p and -n are both 0")
    engine = Engine(args.artifact, max_context=args.n_depth + max(args.n_prompt, args.n_gen, 1))
    tok = engine.tokenizer
    bos = tok.bos_token_id if tok is not None and tok.add_bos else None
    tests = bench_session(engine.session, engine.config.vocab_size, args.n_prompt, args.n_gen, args.repetitions,
                          bos, progress=None if args.quiet else lambda t, i, n: count(t, i, n), depth=args.n_depth)
    model = Path(args.artifact).resolve().name
    threads = configure_tvm_threads(args.threads)
    backend = "CPU" + (f" + {engine.prefill_on} prefill" if engine.prefill_on != "cpu" else "")
    rows = [{"model": model, "size_mib": engine.weight_bytes / 2**20,
             "params_m": _parameters(engine.config) / 1e6, "backend": backend, "threads": threads,
             **t.to_dict()} for t in tests]
    end_open_line()
    print(markdown_table(rows))
    if args.output:
        write_json_atomic(args.output, {"artifact": str(args.artifact), "tests": rows})
        print(f"wrote {args.output}", file=sys.stderr)
    return 0


def _parameters(c) -> int:
    """Parameter count of a dense decoder from its architecture."""
    attn = c.hidden_size * (c.num_heads + 2 * c.num_kv_heads) * c.head_dim + c.num_heads * c.head_dim * c.hidden_size
    ffn = 3 * c.hidden_size * c.intermediate_size * max(1, c.num_experts)
    emb = c.vocab_size * c.hidden_size * (1 if c.tie_embeddings else 2)
    return int(c.num_layers * (attn + ffn + 2 * c.hidden_size) + emb + c.hidden_size)


def cmd_perplexity(args: argparse.Namespace) -> int:

    path = Path(args.artifact)
    manifest = read_manifest(path)
    if manifest.kind not in ("llm", "packed"):
        raise XpucError(f"{path}: perplexity needs a language model (this is a '{manifest.kind}' artifact)")
    limit = int(manifest.config.get("context_length", 2048))
    if args.ctx > limit:
        raise XpucError(f"--ctx {args.ctx} exceeds the model's context length of {limit} tokens")
    try:
        text = Path(args.text).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise XpucError(f"{args.text}: cannot read the text ({type(e).__name__})") from None
    if not (path / "tokenizer.json").is_file():
        raise XpucError(f"{path}: artifact has no tokenizer")
    tok = XpucTokenizer.from_artifact_dir(path)
    ids = tok.encode(text, add_bos=False)
    bos = tok.bos_token_id if tok.add_bos else None
    show = None if args.json or args.quiet else _progress
    if manifest.kind == "packed":
        share, total = parse_budget(args.budget) if args.budget else (None, None)
        if total is not None:
            raise XpucError("xpuc perplexity takes --budget as a share of the FFN (e.g. 50%)")
        with OffloadModel(path, parse_modes(args.mode)[0], share, context=args.ctx) as m:
            res = perplexity(m, ids, args.ctx, bos, args.chunks, show)
        what = f"packed, mode {args.mode}, FFN {100 * m.ffn_fraction:.0f} % in memory"
    else:
        from xpuc.runtime.engine import Engine

        engine = Engine(path, max_context=args.ctx)
        res = perplexity(engine.session, ids, args.ctx, bos, args.chunks, show)
        what = "compiled" + (", thresholded sparse FFN" if manifest.config.get("ffn_thresholds") else "")
    end_open_line()
    out = {"artifact": str(path), "engine": what, "text": args.text, "text_tokens": len(ids), "ctx": res.ctx,
           "chunks": res.chunks, "tokens_scored": res.tokens_scored, "ppl": round(res.ppl, 4),
           "ppl_stderr": round(res.stderr, 5), "mean_nll": round(res.mean_nll, 6), "chunk_ppl": res.chunk_ppl}
    if args.json:
        print(json.dumps(out, indent=1))
    else:
        print(f"PPL = {res.ppl:.4f} +/- {res.stderr:.5f}  ({what}; {res.chunks} chunks of {res.ctx} tokens, "
              f"{res.tokens_scored} tokens scored)")
    return 0


def _progress(i: int, n: int, ppl: float) -> None:
    print(f"[{i}/{n}] running PPL {ppl:.4f}", file=sys.stderr, flush=True)


def add_parsers(sub) -> None:
    p = sub.add_parser("bench", help="speed: llama-bench tests (compiled model) or the offloading modes (packed)",
                       description="A compiled model: llama-bench's ppP/tgN tests, t/s ± stddev over -r runs, a "
                                   "markdown table (and JSON with -o). A packed model: its offloading modes side "
                                   "by side (--budget, --modes, --tokens).")
    p.add_argument("artifact", help="directory from `xpuc compile` or `xpuc pack`")
    p.add_argument("-p", "--n-prompt", type=int_at_least(0), default=512, help="compiled: prompt tokens (pp test)")
    p.add_argument("-n", "--n-gen", type=int_at_least(0), default=128, help="compiled: generated tokens (tg test)")
    p.add_argument("-r", "--repetitions", type=POSITIVE, default=5, help="compiled: runs per test (default 5)")
    p.add_argument("-d", "--n-depth", type=int_at_least(0), default=0,
                   help="compiled: tokens already in the KV cache before each test (llama-bench's -d; default 0)")
    p.add_argument("--budget", default="50%",
                   help="packed: share of the FFN weights kept in memory (50%%) or a total memory budget (2GiB)")
    p.add_argument("--modes", default="naive,llmflash,cache,full", help="packed: comma-separated modes")
    p.add_argument("--tokens", type=POSITIVE, default=32, help="packed: tokens to generate per mode (default 32)")
    p.add_argument("-o", "--output", default=None,
                   help="JSON report (packed models: default bench.json)")
    p.add_argument("--plot", default=None, help="packed: PNG of the ablation (default: next to the JSON)")
    p.add_argument("--io-threads", type=POSITIVE, default=2, help="packed: threads issuing flash reads")
    p.add_argument("--repeats", type=POSITIVE, default=1, help="packed: interleaved rounds; the median counts")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(fn=cmd_bench)

    p = sub.add_parser("perplexity", help="perplexity of a text, by llama-perplexity's method (any language model)")
    p.add_argument("artifact", help="directory from `xpuc compile` or `xpuc pack`")
    p.add_argument("--text", required=True, help="UTF-8 text file to score")
    p.add_argument("--ctx", type=int_at_least(4), default=512, help="tokens per chunk; the second half is scored")
    p.add_argument("--chunks", type=POSITIVE, default=None, help="score at most this many chunks")
    p.add_argument("--mode", default="full", help="packed: naive | llmflash | cache | full")
    p.add_argument("--budget", default=None, help="packed: share of the FFN kept in memory (default: the plan's)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(fn=cmd_perplexity)
