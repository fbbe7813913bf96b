"""Model in, artifact out: ModelSpec -> Relax -> compiled library + fp16 weights + manifest."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import numpy as np

from xpuc.compiler.frontend_onnx import check_model, import_onnx, read_onnx, unverified_ops
from xpuc.compiler.frontends import load_model
from xpuc.compiler.onnx_prepare import graph_inputs, input_dims, prepare_graph
from xpuc.runtime.artifact import MANIFEST, Manifest, ModuleEntry, sha256_file, staged_directory, versions
from xpuc.runtime.errors import XpucError
from xpuc.runtime.formats.profile_stats import ProfileStats
from xpuc.runtime.progress import Steps
from xpuc.runtime.tokenizer import XpucTokenizer
from xpuc.targets.profile import load_profile

LIB_FILE = "model.so"
WEIGHTS_FILE = "params.safetensors"


PREFILL_CHOICES = ("auto", "cpu", "gpu", "npu")


def resolve_prefill(profile, prefill_on: str) -> str:
    """Which processor runs prefill: ``auto`` = the profile's GPU when it has one (never on ``host``).

    ``npu`` is the Hexagon DSP's HVX vector units; ``auto`` prefers the GPU, whose kernels are verified by
    execution (on an OpenCL CPU implementation), over the NPU's, which nothing here can execute.
    """
    if prefill_on not in PREFILL_CHOICES:
        raise XpucError(f"--prefill-on must be one of {', '.join(PREFILL_CHOICES)}")
    if prefill_on == "auto":
        return "gpu" if profile.gpu and not profile.is_host else "cpu"
    if prefill_on == "gpu" and not profile.gpu:
        raise XpucError(f"device '{profile.name}' has no GPU in its profile; use --prefill-on cpu")
    if prefill_on == "npu" and not profile.npu:
        raise XpucError(f"device '{profile.name}' has no NPU in its profile; use --prefill-on cpu")
    return prefill_on


def prefill_module(spec, target, mtriple: str, toolchain, tmp: Path, debug_dump: Path | None,
                   name: str = "prefill_gpu") -> ModuleEntry:
    """Prefill (and its own KV cache) lowered for ``target`` with host code for the CPU, one .so.

    This is the module a device's GPU or NPU runs; at run time its KV cache is handed to the decode module
    (``xpuc.runtime.kv_handoff``). ``target`` may also be the host CPU (the twin the tests execute). A
    Hexagon target gets the CPU phases with HVX vectors and a Hexagon library (host code on the DSP).
    """
    import tvm
    from safetensors.numpy import save_file

    from xpuc.compiler.pipeline import build
    from xpuc.compiler.relax_model import export_model, param_arrays

    hexagon = target.kind.name == "hexagon"
    lib_file, weights_file = f"{name}.so", f"params_{name.removeprefix('prefill_')}.safetensors"
    # the KV cache's attention kernels: TVM picks its CPU kernels for llvm targets, its GPU ones otherwise
    export_target = tvm.target.Target({"kind": "llvm", "mtriple": "hexagon"}) if hexagon else target
    mod, params = export_model(spec.config, export_target, kernels="generic",
                               functions=("prefill", "create_paged_kv_cache"))
    ex = build(mod, target, debug_dump, name)
    if hexagon:
        from xpuc.targets.hexagon import hexagon_fcompile

        ex.export_library(str(tmp / lib_file), fcompile=hexagon_fcompile())
    else:
        ex.export_library(str(tmp / lib_file), fcompile=toolchain.fcompile())
    arrays = param_arrays(spec, kernels="generic")
    save_file({n: arrays[n] for n, _, _ in params}, str(tmp / weights_file))
    kernels, info = _kernels_of(ex, target, mod)
    return ModuleEntry(name=name, file=lib_file, role="prefill", target=str(target),
                       mtriple="hexagon" if hexagon else mtriple,
                       toolchain="clang+lld (hexagon)" if hexagon else toolchain.name, kernels=kernels,
                       weights=weights_file,
                       info={**info, "params": [{"name": n, "shape": list(s), "dtype": str(d)} for n, s, d in params]})


def _kernels_of(ex, target, mod) -> tuple[list[str], dict]:
    """Kernel names and sizes of a built prefill module: from the device source (OpenCL, CUDA), the
    Hexagon assembly (with the count of HVX vector loads/stores), or the module's PrimFuncs (CPU)."""

    import tvm

    imports = ex.mod.imports[0].imports if ex.mod.imports else []
    if target.kind.name == "hexagon":
        asm = ex.mod.imports[0].inspect_source("asm") if ex.mod.imports else ""
        kernels = sorted(set(re.findall(r"^__tvm_ffi_(\w+):", asm, re.M)) - {"_library_ctx"})
        return kernels, {"device_kernels": len(kernels), "device_source_bytes": len(asm),
                         "hvx_vector_memory_ops": len(re.findall(r"\bvmemu?\(", asm)),
                         "hvx_qfloat_ops": len(re.findall(r"\.qf32\b", asm))}
    source = imports[0].inspect_source() if imports and target.kind.name != "llvm" else ""
    if source:
        kernels = sorted(set(re.findall(r"(?:__kernel|__global__)\s+void\s+(?:__launch_bounds__\(\d+\)\s+)?(\w+)",
                                        source)))
    else:  # a CPU target: the kernels are the module's PrimFuncs
        kernels = sorted(gv.name_hint for gv, f in mod.functions.items() if isinstance(f, tvm.tirx.PrimFunc))
    return kernels, {"device_kernels": len(kernels), "device_source_bytes": len(source)}


def compile_model(model: str | os.PathLike, output: str | os.PathLike, device: str = "host",
                  force: bool = False, quiet: bool = False, prefill_on: str = "auto",
                  debug_dump: str | os.PathLike | None = None, quantize: str | None = None,
                  ffn_stats: str | os.PathLike | None = None, dot: str = "auto") -> Path:
    """Compile ``model`` (GGUF file or HF directory) for ``device`` into the artifact directory ``output``.

    Decode (and a CPU prefill) is always built for the device's CPU; with ``prefill_on="gpu"`` (the
    default where the profile has a GPU) a second module runs prefill on the GPU. ``debug_dump``
    writes the IR after each lowering phase. ``quantize`` stores the CPU module's projections as GGML
    blocks (``q4_0``/``q4_1``/``q8_0``; embedding and LM head ``q8_0``), or with ``keep`` every matrix as
    the GGUF file stores it (:mod:`xpuc.compiler.weight_formats`); ``ffn_stats`` (a profile from
    ``xpuc profile --sparsity``) gives its decode kernels per-layer activation thresholds (thresholded
    sparsity: the up row of a neuron below its layer's threshold is skipped). The artifact is written to a
    temporary directory beside ``output`` and renamed when complete. ``dot`` picks the decode GEMV's dot products
    over q4_0 / q4_1 / q5_0 / q8_0 blocks (:func:`gemv_dot`).
    """
    import tvm
    from safetensors.numpy import save_file

    from xpuc.compiler.relax_model import export_model, param_arrays

    output = Path(output)
    profile = load_profile(device)
    prefill = resolve_prefill(profile, prefill_on)
    steps = Steps(6 if prefill == "cpu" else 7, quiet)
    dump = Path(debug_dump) if debug_dump else None
    toolchain = profile.toolchain()
    if not toolchain.available():
        raise XpucError(f"toolchain '{toolchain.name}' for {toolchain.mtriple} not found "
                        f"({toolchain.compiler}); install it (Debian: apt-get install clang lld "
                        "gcc-aarch64-linux-gnu) or set TVM_NDK_CC")
    steps.start(f"reading {model}")
    spec = load_model(model)
    if spec.config.is_moe:
        raise XpucError(f"{model}: a mixture-of-experts model ({spec.config.num_experts} experts); `xpuc compile` "
                        "builds dense models — run MoE models with `xpuc profile`, `plan`, `pack` and `run`")
    steps.done(f"{spec.config.architecture}, {spec.config.num_parameters() / 1e6:.0f} M parameters")
    thresholds = _thresholds(spec, quantize, ffn_stats)
    formats = None
    if quantize == "keep":
        from xpuc.compiler.weight_formats import weight_formats

        formats = weight_formats(spec)
        if not quiet:
            print(f"  weights: {formats.summary()}", flush=True)

    with staged_directory(output, force) as tmp:
        steps.start("building the Relax module")
        target = profile.cpu_target()
        dot = gemv_dot(target, dot) if quantize else "float32"
        mod, params = export_model(spec.config, target, quant=quantize,
                                   formats=formats.formats if formats else None, int8=dot == "int8")
        steps.done(f"{len(params)} parameters")

        steps.start(f"compiling for {target.attrs.get('mtriple', 'host')} ({target.attrs.get('mcpu', '')})")
        from xpuc.compiler.pipeline import build

        ex = build(mod, target, dump, "cpu")
        ex.export_library(str(tmp / LIB_FILE), fcompile=toolchain.fcompile())
        kernels = sorted(gv.name_hint for gv, f in mod.functions.items()
                         if isinstance(f, tvm.tirx.PrimFunc))
        steps.done(toolchain.name)

        steps.start("copying the GGUF's weight blocks" if formats else
                    f"quantizing weights to {quantize} (embedding q8_0)" if quantize else "converting weights to fp16")
        arrays = param_arrays(spec, quant=quantize, thresholds=thresholds,
                              formats=formats.formats if formats else None, int8=dot == "int8")
        missing = [n for n, _, _ in params if n not in arrays]
        if missing:
            raise XpucError(f"internal: no weights for parameters {missing[:3]}")
        for name, shape, _ in params:
            if tuple(arrays[name].shape) != tuple(shape):
                raise XpucError(f"weight '{name}' has shape {arrays[name].shape}, the module expects {shape}")
        save_file({n: np.ascontiguousarray(arrays[n]) for n, _, _ in params}, str(tmp / WEIGHTS_FILE))
        size = sum(a.nbytes for a in arrays.values())
        del arrays
        steps.done(f"{size / 2**20:.0f} MiB")

        modules = [ModuleEntry(name="model", file=LIB_FILE,
                               role="prefill+decode" if prefill == "cpu" else "decode",
                               target=str(target), mtriple=str(target.attrs.get("mtriple", "")),
                               toolchain=toolchain.name, kernels=kernels,
                               info={"weights": formats.summary() if formats else quantize or "float16",
                                     **({"embedding": "q8_0"} if quantize and not formats else {}),
                                     **({"ffn_thresholds": thresholds, "dot": dot} if quantize else {})})]
        files = [LIB_FILE, WEIGHTS_FILE]
        if prefill != "cpu":
            xpu = profile.gpu if prefill == "gpu" else profile.npu
            steps.start(f"compiling prefill for the {prefill.upper()} ({xpu.get('name', xpu['kind'])})")
            xpu_target = profile.gpu_target() if prefill == "gpu" else profile.npu_target()
            modules.append(prefill_module(spec, xpu_target, profile.mtriple, toolchain, tmp, dump,
                                          name=f"prefill_{prefill}"))
            files += [modules[-1].file, modules[-1].weights]
            steps.done(f"{modules[-1].info['device_kernels']} kernels")

        steps.start("writing tokenizer and manifest")
        if spec.tokenizer is not None:
            files += XpucTokenizer.from_source(spec.tokenizer).save(tmp)
        src = Path(spec.source)
        manifest = Manifest(
            versions=versions(),
            device=profile.summary(),
            config=spec.config.to_dict(),
            source={"path": str(src.resolve()), "format": spec.source_format,
                    "sha256": sha256_file(src) if src.is_file() else None},
            modules=modules,
            params=[{"name": n, "shape": list(s), "dtype": str(d)} for n, s, d in params],
            weights_file=WEIGHTS_FILE,
            files={f: sha256_file(tmp / f) for f in files},
        )
        (tmp / MANIFEST).write_text(manifest.to_json())
        steps.done()
        steps.start(f"finishing {output}")
    steps.done()
    return output


def gemv_dot(target, dot: str = "auto") -> str:
    """The quantized matrices' dot products: ``int8`` (activations quantized to int8 blocks, llama.cpp's way; x86
    with AVX-512 VNNI, aarch64 with the dot-product extension) where ``dot`` asks for it or, with ``auto``, where
    the target has the instructions; else ``float32``."""
    from xpuc.schedules.int8_dot import int8_dot_isa

    available = bool(int8_dot_isa(target))
    if dot == "int8" and not available:
        raise XpucError(f"--dot int8: the int8 kernels need AVX-512 VNNI (x86) or the dot-product extension "
                        f"(aarch64 +dotprod); target {target.attrs.get('mcpu', '?')} has neither (use --dot float32)")
    return "int8" if dot == "int8" or (dot == "auto" and available) else "float32"


def _thresholds(spec, quantize: str | None, ffn_stats) -> list[float] | None:
    """Per-layer FFN thresholds for the quantized decode kernels (zeros = exact) from a profile."""
    if ffn_stats is None:
        return [0.0] * spec.config.num_layers if quantize else None

    stats = ProfileStats.load(ffn_stats)
    stats.check_matches(spec.config, f"profile {ffn_stats}", spec.fingerprint())
    if spec.config.ffn_kind != "swiglu":
        return [0.0] * spec.config.num_layers  # ReLU kinds: a neuron fires when its gate is positive
    return [float(t) for t in stats.thresholds]


GRAPH_LIB_FILE = "graph.so"
GRAPH_WEIGHTS_FILE = "params.safetensors"  # the graph's constant tensors (LiftConstants), read by GraphRunner


def compile_onnx(model: str | os.PathLike, output: str | os.PathLike, device: str = "host", force: bool = False,
                 quiet: bool = False, prefill_on: str = "auto", debug_dump: str | os.PathLike | None = None,
                 tuning_db: str | os.PathLike | None = None, buckets: tuple[int, ...] | None = None,
                 input_shapes: dict[str, tuple[int, ...]] | None = None, simplify: bool = True) -> Path:
    """Compile an ONNX graph for the device's CPU, GPU or NPU into an artifact directory: the library
    (``graph.so``) and its constant tensors (``params.safetensors``, lifted out of the library by
    :class:`~xpuc.compiler.passes.lift_constants.LiftConstants` after lowering).

    The graph is first prepared (:func:`~xpuc.compiler.onnx_prepare.prepare_graph`): ``input_shapes`` fix
    input dims, and with ``simplify`` onnxslim infers shapes and folds constants.

    With ``tuning_db`` (a directory from ``xpuc tune``) the graph also gets a static copy per sequence
    bucket (the database's buckets unless ``buckets`` is given) whose kernels take their tuned schedules;
    the database must cover at least one kernel.
    """
    from tvm.relax.frontend import detach_params

    from xpuc.compiler.passes.apply_tuning_database import tuning_report
    from xpuc.compiler.passes.lift_constants import LiftConstants
    from xpuc.compiler.pipeline import compile_lowered, lower

    output = Path(output)
    profile = load_profile(device)
    where = resolve_prefill(profile, prefill_on)
    toolchain = profile.toolchain()
    if not toolchain.available():
        raise XpucError(f"toolchain '{toolchain.name}' for {toolchain.mtriple} not found ({toolchain.compiler})")
    steps = Steps(3, quiet)
    steps.start(f"importing {model}")
    proto = read_onnx(model)
    check_model(proto, str(model), ops=False)  # operators are checked after folding, by import_onnx
    proto, prepared = prepare_graph(proto, input_shapes, str(model), simplify)
    if "not_simplified" in prepared and simplify and not quiet:
        print(f"xpuc: warning: {model}: imported without simplification ({prepared['not_simplified']})",
              file=sys.stderr)
    inputs = [{"name": i.name, "dtype": int(i.type.tensor_type.elem_type), "shape": input_dims(i)}
              for i in graph_inputs(proto)]
    outputs = [{"name": o.name, "shape": input_dims(o)} for o in proto.graph.output]
    symbolic = sorted({d for i in inputs for d in i["shape"] if isinstance(d, str)})
    hint = f"; fix the symbolic dims ({', '.join(symbolic)}) with --input-shape NAME=DIMS" if symbolic else ""
    try:
        mod = import_onnx(proto, str(model))
    except XpucError as e:
        if hint and "cannot import" in str(e):
            raise XpucError(f"{e}{hint}") from None
        raise
    unverified = unverified_ops(proto)
    if unverified:  # TVM converts them, but some of their node tests fail: say so, and record it
        prepared["unverified_ops"] = unverified
        if not quiet:
            print(f"xpuc: warning: {model}: operators outside xpuc's verified set (TVM's converter fails some of "
                  f"their ONNX node tests; compare the outputs): {', '.join(unverified)}", file=sys.stderr)
    steps.done(f"{prepared['nodes_in']} nodes" + (f", {prepared['nodes_out']} after {prepared['simplified_by']}"
                                                  if "simplified_by" in prepared else "")
               + (f"; symbolic dims {', '.join(symbolic)}" if symbolic else ""))
    target = {"gpu": profile.gpu_target, "npu": profile.npu_target}.get(where, profile.cpu_target)()
    hexagon = target.kind.name == "hexagon"
    if hexagon:
        from xpuc.targets.hexagon import hexagon_fcompile

        fcompile = hexagon_fcompile()
    else:
        fcompile = toolchain.fcompile()
    tuning, tuned_info = None, {}
    if tuning_db is not None:
        tuning, buckets, tuned_info = _open_tuning(tuning_db, target, buckets)
    with staged_directory(output, force) as tmp:
        steps.start(f"compiling for {target.kind.name} ({'hexagon' if hexagon else profile.mtriple})")
        try:
            lowered = lower(mod, target, Path(debug_dump) if debug_dump else None, "graph", buckets or (), tuning)
        except Exception as e:  # TVM's passes reject some graphs (mostly symbolic shapes) with assertions
            msg = (str(e).strip().splitlines() or [""])[-1]
            raise XpucError(f"{model}: TVM cannot lower this graph ({type(e).__name__}: {msg[:160]}){hint}") from None
        report = tuning_report(lowered)
        if report is not None:
            if report["from_database"] == 0 and report["kept_default"] == 0:
                raise XpucError(f"tuning database {tuning_db} covers none of the {report['tunable']} tunable kernels "
                                "of this graph (tuned for another model, or other --buckets)")
            tuned_info.update(tuned_kernels=report["from_database"], tunable_kernels=report["tunable"],
                              kept_default_schedule=report["kept_default"])
        lowered, lifted = detach_params(LiftConstants()(lowered))
        if debug_dump:
            (Path(debug_dump) / "graph" / "99_lift.py").write_text(lowered.script())
        ex = compile_lowered(lowered, target)
        ex.export_library(str(tmp / GRAPH_LIB_FILE), fcompile=fcompile)
        params, function_params = _save_graph_params(lowered, lifted, tmp / GRAPH_WEIGHTS_FILE)
        kernels = sorted(gv.name_hint for gv, f in mod.functions.items() if type(f).__name__ == "PrimFunc")
        if hexagon:
            kernels, info = _kernels_of(ex, target, mod)
            tuned_info.update(info)
        linker = "clang+lld (hexagon)" if hexagon else toolchain.name
        steps.done(linker + (f"; {report['from_database']} of {report['tunable']} kernels from the tuning database"
                             + (f", {report['kept_default']} kept the default schedule (measured faster)"
                                if report["kept_default"] else "") if report is not None else ""))
        steps.start("writing manifest")
        src = Path(model)
        manifest = Manifest(
            versions=versions(), device=profile.summary(), config={},
            source={"path": str(src.resolve()), "format": "onnx", "sha256": sha256_file(src), "prepared": prepared},
            modules=[ModuleEntry(name="graph", file=GRAPH_LIB_FILE, role="graph", target=str(target),
                                 mtriple="hexagon" if hexagon else profile.mtriple,
                                 toolchain=linker, kernels=kernels,
                                 info=tuned_info)],
            params=params, weights_file=GRAPH_WEIGHTS_FILE if params else "",
            files={f: sha256_file(tmp / f) for f in (GRAPH_LIB_FILE, *([GRAPH_WEIGHTS_FILE] if params else []))},
            kind="graph", io={"inputs": inputs, "outputs": outputs, "buckets": list(buckets or ()),
                              "function_params": function_params})
        (tmp / MANIFEST).write_text(manifest.to_json())
        steps.done()
    return output


def _save_graph_params(mod, lifted: dict, path: Path) -> tuple[list[dict], dict[str, list[str]]]:
    """Write the lifted constants to ``path`` (safetensors); (manifest params, function -> parameter names)."""
    from safetensors.numpy import save_file

    arrays: dict[str, np.ndarray] = {}
    function_params: dict[str, list[str]] = {}
    for fn, values in lifted.items():
        names = [str(v.name) for v in mod[fn].params[-len(values):]]
        function_params[fn] = names
        for n, v in zip(names, values, strict=True):
            arrays.setdefault(n, np.ascontiguousarray(v.numpy()))
    if arrays:
        save_file(arrays, str(path))
    params = [{"name": n, "shape": list(a.shape), "dtype": str(a.dtype)} for n, a in arrays.items()]
    return params, function_params


def _open_tuning(path, target, buckets):
    """(ApplyTuningDatabase pass, buckets, manifest info) for a tuning database checked against ``target``."""
    from xpuc.compiler.passes.apply_tuning_database import ApplyTuningDatabase
    from xpuc.compiler.tuning_db import TuningDatabase

    db = TuningDatabase(path, target=target)
    if not buckets:
        buckets = tuple(sorted({w.bucket for w in db.index.workloads.values()}))
    if not buckets:
        raise XpucError(f"tuning database {path} has no tuned workloads yet (run `xpuc tune` first)")
    wins, stale = db.default_wins()
    if stale:
        print(f"xpuc: warning: tuning database {path}: {stale} of {len(db.index.workloads)} workloads were "
              "compared with an older default schedule (or none); rerun `xpuc tune` on it to re-measure the defaults",
              file=sys.stderr)
    return ApplyTuningDatabase(db.ms, target, frozenset(wins)), tuple(buckets), {
        "tuning_db": str(Path(path).resolve()), "buckets": list(buckets)}
