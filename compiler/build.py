"""Model in, artifact out: ModelSpec -> Relax -> compiled library + fp16 weights + manifest."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from xpuc.compiler.errors import XpucError
from xpuc.compiler.frontends import load_model
from xpuc.compiler.progress import Steps
from xpuc.runtime.artifact import MANIFEST, Manifest, ModuleEntry, staged_directory, versions
from xpuc.targets.profile import load_profile

LIB_FILE = "model.so"
WEIGHTS_FILE = "params.safetensors"


def compile_model(model: str | os.PathLike, output: str | os.PathLike, device: str = "host",
                  force: bool = False, quiet: bool = False) -> Path:
    """Compile ``model`` (GGUF file or HF directory) for ``device`` into the artifact directory ``output``.

    The artifact is written to a temporary directory beside ``output`` and renamed when complete.
    """
    import tvm
    from safetensors.numpy import save_file

    from xpuc.compiler.relax_model import export_model, param_arrays
    from xpuc.compiler.zoo import sha256_file
    from xpuc.runtime.tokenizer import XpucTokenizer

    steps = Steps(6, quiet)
    output = Path(output)
    profile = load_profile(device)
    toolchain = profile.toolchain()
    if not toolchain.available():
        raise XpucError(f"toolchain '{toolchain.name}' for {toolchain.mtriple} not found "
                        f"({toolchain.compiler}); install it (Debian: apt-get install clang lld "
                        "gcc-aarch64-linux-gnu) or set TVM_NDK_CC")
    steps.start(f"reading {model}")
    spec = load_model(model)
    steps.done(f"{spec.config.architecture}, {spec.config.num_parameters() / 1e6:.0f} M parameters")

    with staged_directory(output, force) as tmp:
        steps.start("building the Relax module")
        target = profile.cpu_target()
        mod, params = export_model(spec.config, target)
        steps.done(f"{len(params)} parameters")

        steps.start(f"compiling for {target.attrs.get('mtriple', 'host')} ({target.attrs.get('mcpu', '')})")
        with target:
            ex = tvm.compile(mod, target=target)
        ex.export_library(str(tmp / LIB_FILE), fcompile=toolchain.fcompile())
        kernels = sorted(gv.name_hint for gv, f in mod.functions.items()
                         if isinstance(f, tvm.tirx.PrimFunc))
        steps.done(toolchain.name)

        steps.start("converting weights to fp16")
        arrays = param_arrays(spec)
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

        steps.start("writing tokenizer and manifest")
        files = [LIB_FILE, WEIGHTS_FILE]
        if spec.tokenizer is not None:
            files += XpucTokenizer.from_source(spec.tokenizer).save(tmp)
        src = Path(spec.source)
        manifest = Manifest(
            versions=versions(),
            device=profile.summary(),
            config=spec.config.to_dict(),
            source={"path": str(src.resolve()), "format": spec.source_format,
                    "sha256": sha256_file(src) if src.is_file() else None},
            modules=[ModuleEntry(name="model", file=LIB_FILE, role="prefill+decode",
                                 target=str(target), mtriple=str(target.attrs.get("mtriple", "")),
                                 toolchain=toolchain.name, kernels=kernels)],
            params=[{"name": n, "shape": list(s), "dtype": str(d)} for n, s, d in params],
            weights_file=WEIGHTS_FILE,
            files={f: sha256_file(tmp / f) for f in files},
        )
        (tmp / MANIFEST).write_text(manifest.to_json())
        steps.done()
        steps.start(f"finishing {output}")
    steps.done()
    return output
