"""``xpuc compile``: a model or an ONNX graph into an artifact directory."""

from __future__ import annotations

import argparse

from xpuc.compiler.build import compile_model, compile_onnx
from xpuc.compiler.frontend_gguf import is_gguf
from xpuc.compiler.onnx_prepare import parse_input_shapes
from xpuc.compiler.zoo import resolve_model
from xpuc.runtime.errors import XpucError


def cmd_compile(args: argparse.Namespace) -> int:

    if str(args.model).endswith(".onnx"):
        from xpuc.compiler.tuning.workloads import parse_buckets

        print(compile_onnx(args.model, args.output, device=args.device, force=args.force, quiet=args.quiet,
                           prefill_on=args.prefill_on, debug_dump=args.debug_dump, tuning_db=args.tuning_db,
                           buckets=parse_buckets(args.buckets) if args.buckets else None,
                           input_shapes=parse_input_shapes(args.input_shape), simplify=not args.no_simplify))
        return 0
    if args.input_shape or args.no_simplify:
        raise XpucError("--input-shape and --no-simplify apply to ONNX graphs (xpuc compile model.onnx ...)")
    if args.tuning_db:
        raise XpucError("--tuning-db applies to ONNX graphs (xpuc compile model.onnx --tuning-db DIR): a model "
                        "artifact's kernels are hand-scheduled TIR; `xpuc tune MODEL` tunes its dense prefill graph")
    model = resolve_model(args.model)
    quantize = args.quantize or ("keep" if is_gguf(model) else "fp16")  # a GGUF keeps its formats by default
    if args.ffn_stats and quantize == "fp16":
        raise XpucError("--ffn-stats sets the thresholds of the quantized decode kernels; "
                        "add --quantize q4_0|q4_1|keep")
    if args.dot == "int8" and quantize == "fp16":
        raise XpucError("--dot int8 applies to GGML blocks; a float16 build has none (add --quantize keep|q4_0|q4_1)")
    out = compile_model(model, args.output, device=args.device, force=args.force,
                        quiet=args.quiet, prefill_on=args.prefill_on, debug_dump=args.debug_dump,
                        quantize=None if quantize == "fp16" else quantize, ffn_stats=args.ffn_stats, dot=args.dot)
    print(out)
    return 0


def add_parsers(sub) -> None:
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
    p.add_argument("--input-shape", metavar="NAME=DIMS", action="append", default=None,
                   help="ONNX: fix an input's dims, e.g. x=1,3,48,320 (repeatable); computed shapes then fold")
    p.add_argument("--no-simplify", action="store_true",
                   help="ONNX: import the graph as is (no onnxslim shape inference / constant folding)")
    p.add_argument("--dot", default="auto", choices=["auto", "int8", "float32"],
                   help="dot products over GGML blocks: int8 (activations quantized to 8-bit blocks; x86 AVX-512 "
                        "VNNI, arm64 sdot), float32, or auto (default: int8 where the device has it)")
    p.add_argument("--quantize", default=None, choices=["keep", "fp16", "q4_0", "q4_1", "q8_0"],
                   help="weights of the CPU module. keep (the default for a GGUF): every matrix as the file "
                        "stores it (q4_0 q4_1 q5_0 q8_0 q4_k q5_k q6_k; others converted to q8_0, and said so); "
                        "fp16 (the default otherwise); q4_0/q4_1/q8_0: re-quantized (embedding/LM head q8_0)")
    p.add_argument("--ffn-stats", metavar="PROFILE", default=None,
                   help="with --quantize: per-layer FFN thresholds from `xpuc profile --sparsity` (sparse decode)")
    p.set_defaults(fn=cmd_compile)
