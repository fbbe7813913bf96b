"""`xpuc pack`: everything the offloading runtime needs, in one verified directory.

Contents::

    offload.json          versioned manifest: config, versions, SHA-256 of every small file, ffn.bin size
    fixed.safetensors     the fixed segment: embeddings, attention, LM head in fp16 or GGML blocks (``fixed_dtype``:
                          one (rows, in/32 * block bytes) uint8 matrix each), norms and routers fp32
    ffn.bin               FFN neuron-cluster records (see flash_layout), checked per record by CRC-32
    ffn.crc32.npy         the per-record CRC-32s
    flash.json            flash layout (neuron order and offsets per layer)
    plan.json             the planner's decisions
    profile.json          the profiler's statistics (frequencies and thresholds)
    predictor.safetensors the activation predictor
    tokenizer.json, tokenizer_config.json   when the model has a tokenizer
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from xpuc.compiler.errors import XpucError

OFFLOAD_FORMAT = "xpuc-offload"
OFFLOAD_SCHEMA = 1
FIXED_DTYPES = ("float16", "q8_0", "q4_0", "q4_1")
SMALL_FILES = ("fixed.safetensors", "ffn.crc32.npy", "flash.json", "plan.json", "profile.json",
               "predictor.safetensors")


def pack_offload(model: str, stats_path: str, plan_path: str, predictor_path: str, out: str | Path,
                 force: bool = False, quiet: bool = False, fixed_dtype: str = "float16") -> Path:
    """Write the packed model; ``fixed_dtype`` is the format of the fixed segment's matrices (attention
    projections, embedding, LM head; MoE routers stay fp32): fp16, or GGML blocks run by the quantized
    GEMV kernels (:mod:`xpuc.schedules.linear_quant`)."""
    from safetensors.numpy import save_file

    from xpuc.schedules.linear_quant import quantize_rows

    if fixed_dtype not in FIXED_DTYPES:
        raise XpucError(f"--fixed-dtype must be one of {', '.join(FIXED_DTYPES)}")
    from xpuc.compiler.flash_layout import write_flash_layout
    from xpuc.compiler.frontends import load_model
    from xpuc.compiler.planner import Plan
    from xpuc.compiler.predictor import Predictor
    from xpuc.compiler.profiler import ProfileStats
    from xpuc.compiler.progress import count
    from xpuc.compiler.zoo import resolve_model, sha256_file
    from xpuc.runtime.artifact import staged_directory, versions

    spec = load_model(resolve_model(model))
    c = spec.config
    stats = ProfileStats.load(stats_path)
    stats.check_matches(c, "--stats")
    plan = Plan.load(plan_path)
    if plan.model != c.to_dict():
        raise XpucError("--plan was made for another model")
    predictor = Predictor.load(predictor_path)
    predictor.check_matches(spec)
    if len(predictor.layers) != c.ffn_units:
        raise XpucError("--predictor: FFN unit count does not match the model")
    out = Path(out)
    with staged_directory(out, force) as tmp:
        fl = write_flash_layout(spec, plan.hot_neurons, stats.frequency, plan.cluster, plan.weight_dtype, tmp,
                                progress=None if quiet else lambda i, n: count("writing FFN records, unit", i, n))
        ffn = {"gate_proj", "up_proj", "down_proj"}
        fixed = {}
        for k in c.weight_shapes():
            if k.split(".")[-1] not in ffn:
                w = spec.weights[k]
                if w.ndim == 2 and fixed_dtype != "float16" and not k.endswith("router"):
                    if w.shape[1] % 32:
                        raise XpucError(f"--fixed-dtype {fixed_dtype}: '{k}' has {w.shape[1]} columns, not a "
                                        "multiple of 32; use --fixed-dtype float16")
                    fixed[k] = quantize_rows(w, fixed_dtype)
                else:
                    fixed[k] = np.ascontiguousarray(w.astype(np.float16 if w.ndim == 2 else np.float32))
        save_file(fixed, str(tmp / "fixed.safetensors"))
        plan.save(tmp / "plan.json")
        stats.save(tmp / "profile.json")
        shutil.copyfile(predictor_path, tmp / "predictor.safetensors")
        files = {n: sha256_file(tmp / n) for n in SMALL_FILES}
        sample: list[int] = []
        if spec.tokenizer is not None:
            from xpuc.runtime.tokenizer import XpucTokenizer

            tok = XpucTokenizer.from_source(spec.tokenizer)
            for n in tok.save(tmp):
                files[n] = sha256_file(tmp / n)
            sample = tok.encode("The cache keeps the hot neurons in memory and reads the others from flash.")
        manifest = {"format": OFFLOAD_FORMAT, "schema": OFFLOAD_SCHEMA, "versions": versions(), "config": c.to_dict(),
                    "files": files, "ffn_bytes": fl.file_bytes, "sample_prompt": sample, "fixed_dtype": fixed_dtype}
        (tmp / "offload.json").write_text(json.dumps(manifest, indent=1))
    return out


@dataclass
class OffloadArtifact:
    path: Path
    config: object
    flash: object
    plan: object
    stats: object
    predictor: object
    crcs: np.ndarray
    fixed: dict
    sample_prompt: list[int]
    fixed_dtype: str = "float16"


def load_offload_artifact(path: Path) -> OffloadArtifact:
    from safetensors.numpy import load_file

    from xpuc.compiler.flash_layout import FlashLayout
    from xpuc.compiler.planner import Plan
    from xpuc.compiler.predictor import Predictor
    from xpuc.compiler.profiler import ProfileStats
    from xpuc.compiler.spec import ArchConfig

    mf = path / "offload.json"
    if not mf.is_file():
        raise XpucError(f"{path}: not a packed xpuc model (no offload.json; create one with `xpuc pack`)")
    try:
        d = json.loads(mf.read_text())
    except json.JSONDecodeError as e:
        raise XpucError(f"{mf}: corrupted ({e})") from None
    if d.get("format") != OFFLOAD_FORMAT or d.get("schema") != OFFLOAD_SCHEMA:
        raise XpucError(f"{mf}: not an xpuc offload manifest of schema {OFFLOAD_SCHEMA}; repack the model")
    from xpuc.runtime.artifact import verify_files

    verify_files(path, d["files"], "repack the model")
    ffn = path / "ffn.bin"
    if not ffn.is_file() or ffn.stat().st_size != d["ffn_bytes"]:
        size = ffn.stat().st_size if ffn.is_file() else 0
        raise XpucError(f"{ffn}: {size} bytes, expected {d['ffn_bytes']} (truncated or replaced); repack the model")
    config = ArchConfig.from_dict(d["config"])
    return OffloadArtifact(path, config, FlashLayout.load(path / "flash.json"), Plan.load(path / "plan.json"),
                           ProfileStats.load(path / "profile.json"), Predictor.load(path / "predictor.safetensors"),
                           np.load(path / "ffn.crc32.npy"), load_file(str(path / "fixed.safetensors")),
                           d.get("sample_prompt", []), d.get("fixed_dtype", "float16"))
