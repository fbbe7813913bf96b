"""`xpuc pack`: everything the offloading runtime needs, compiled and verified, in one directory.

Contents::

    manifest.json         the artifact manifest (kind ``packed``, :mod:`xpuc.runtime.formats.manifest`): config,
                          versions, target, both modules, SHA-256 of every file but ffn.bin and its size, the
                          fingerprint
    decode.so, ffn.so     the compiled modules for the device (see :mod:`xpuc.compiler.offload_build`)
    fixed.safetensors     the fixed segment in the kernels' storage: embedding, attention, LM head (fp16 row-block
                          packed, or GGML blocks with ``fixed_dtype``), norms and routers fp32, the activation
                          predictor (fp16 packed; its output rows in flash order)
    ffn.bin               FFN neuron-cluster records (see flash_layout), checked per record by CRC-32
    ffn.crc32.npy         the per-record CRC-32s
    flash.json            flash layout (neuron order and offsets per layer)
    plan.json             the planner's decisions
    profile.json          the profiler's statistics (frequencies and thresholds)
    predictor.safetensors the activation predictor as trained (for inspection and tests)
    tokenizer.json, tokenizer_config.json   when the model has a tokenizer
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np

from xpuc.compiler.flash_layout import write_flash_layout
from xpuc.compiler.frontends import load_model
from xpuc.compiler.zoo import resolve_model
from xpuc.runtime.artifact import sha256_file, staged_directory, versions
from xpuc.runtime.errors import XpucError
from xpuc.runtime.formats.manifest import MANIFEST, Manifest, ModuleEntry, OffloadInfo
from xpuc.runtime.formats.plan import Plan
from xpuc.runtime.formats.predictor import Predictor
from xpuc.runtime.formats.profile_stats import ProfileStats
from xpuc.runtime.packed import FIXED_DTYPES, SMALL_FILES, load_packed
from xpuc.runtime.progress import Steps, count
from xpuc.targets.profile import load_profile


def fixed_segment(spec, predictor, flash, fixed_dtype: str) -> dict[str, np.ndarray]:
    """The in-memory weights, each in the storage its compiled kernel reads."""
    from xpuc.compiler.offload_build import embed_format, matrix_storage

    c, w = spec.config, spec.weights
    efmt = embed_format(fixed_dtype)
    out = {"final_norm": w["final_norm"].astype(np.float32), "embed": matrix_storage(w["embed_tokens"], efmt)}
    if not c.tie_embeddings:
        out["lm_head"] = matrix_storage(w["lm_head"], efmt)
    for i in range(c.num_layers):
        p = f"layers.{i}."
        out[p + "attn_norm"] = w[p + "attn_norm"].astype(np.float32)
        out[p + "ffn_norm"] = w[p + "ffn_norm"].astype(np.float32)
        out[p + "qkv"] = matrix_storage(np.concatenate([w[p + "q_proj"], w[p + "k_proj"], w[p + "v_proj"]]),
                                        fixed_dtype)
        if c.qkv_bias:
            out[p + "qkv_bias"] = np.concatenate([w[p + "q_bias"], w[p + "k_bias"], w[p + "v_bias"]]).astype(
                np.float16)
        out[p + "o"] = matrix_storage(w[p + "o_proj"], fixed_dtype)
        if c.is_moe:
            out[p + "router"] = w[p + "router"].astype(np.float32)
    for u, lp in enumerate(predictor.layers):
        order = np.asarray(flash.layers[u].order)
        q = f"units.{u}."
        out[q + "w1"] = matrix_storage(lp.w1, "float16")
        out[q + "b1"] = lp.b1.astype(np.float32)
        out[q + "w2"] = matrix_storage(lp.w2[order], "float16")
        out[q + "b2"] = lp.b2[order].astype(np.float32)
        out[q + "thr"] = np.array([lp.threshold], np.float32)
    return out


def pack_offload(model: str, stats_path: str, plan_path: str, predictor_path: str, out: str | Path,
                 force: bool = False, quiet: bool = False, fixed_dtype: str = "float16", device: str = "host",
                 layout: str = "coactivation", records: str = "auto", dot: str = "auto") -> Path:
    """Write the packed model and compile its modules for ``device``.

    ``fixed_dtype`` is the format of the fixed segment's matrices (attention projections, embedding, LM head;
    MoE routers stay fp32): fp16, or GGML blocks run by the quantized GEMV kernels
    (:mod:`xpuc.schedules.linear_quant`). ``layout``: the cold neurons' order on flash, ``coactivation`` (the
    profile's co-activation order, where it recorded one) or ``frequency`` (most frequent first). ``records``:
    ``split`` (gate rows apart from up/down rows, read only for neurons whose gate fired; clusters of one neuron
    of a gated FFN), ``whole`` or ``auto`` (split where it applies). ``dot``: the neuron-cluster kernels' dot
    products, ``int8`` (activations quantized to int8 blocks), ``float32`` or ``auto`` (int8 where the device's
    CPU has the instructions and the records are q4_0; :func:`xpuc.compiler.offload_build.sparse_dot`).
    """
    from safetensors.numpy import save_file

    if fixed_dtype not in FIXED_DTYPES:
        raise XpucError(f"--fixed-dtype must be one of {', '.join(FIXED_DTYPES)}")
    if layout not in ("coactivation", "frequency"):
        raise XpucError(f"--layout must be coactivation or frequency, got '{layout}'")
    if records not in ("auto", "split", "whole"):
        raise XpucError(f"--records must be auto, split or whole, got '{records}'")
    if dot not in ("auto", "int8", "float32"):
        raise XpucError(f"--dot must be auto, int8 or float32, got '{dot}'")
    from xpuc.compiler.offload_build import export_offload_modules

    profile = load_profile(device)
    spec = load_model(resolve_model(model))
    c = spec.config
    fingerprint = spec.fingerprint()
    stats = ProfileStats.load(stats_path)
    stats.check_matches(c, "--stats", fingerprint)
    plan = Plan.load(plan_path)
    if plan.model != json.loads(json.dumps(c.to_dict())) or plan.fingerprint != fingerprint:
        raise XpucError(f"--plan was made for another model (fingerprint {plan.fingerprint or 'none'} is not this "
                        f"model's {fingerprint}); run xpuc plan with this model file and its profile")
    predictor = Predictor.load(predictor_path)
    predictor.check_matches(fingerprint, "--predictor")
    if len(predictor.layers) != c.ffn_units:
        raise XpucError("--predictor: FFN unit count does not match the model")
    if len({lp.rank for lp in predictor.layers}) != 1:
        raise XpucError("--predictor: its units have different ranks "
                        f"({sorted({lp.rank for lp in predictor.layers})}); the decode module compiles one "
                        "predict function: train it again with xpuc profile --predictor")
    if fixed_dtype != "float16" and c.hidden_size % 32:
        raise XpucError(f"--fixed-dtype {fixed_dtype}: hidden size {c.hidden_size} is not a multiple of 32; "
                        "use --fixed-dtype float16")
    order = stats.coactivation if layout == "coactivation" else None
    if order and not (isinstance(order, list) and len(order) == c.ffn_units
                      and all(isinstance(o, list) and all(isinstance(i, int) for i in o) for o in order)):
        raise XpucError("--stats: malformed co-activation order (expected a list of neuron ids per FFN unit); "
                        "profile the model again or pack with --layout frequency")
    splittable = plan.cluster == 1 and c.ffn_kind != "relu"
    if records == "split" and not splittable:
        raise XpucError(f"--records split needs clusters of one neuron of a gated FFN (the plan has clusters of "
                        f"{plan.cluster}, the FFN is '{c.ffn_kind}'); use --records whole")
    out = Path(out)
    with staged_directory(out, force) as tmp:
        fl = write_flash_layout(spec, plan.hot_neurons, stats.frequency, plan.cluster, plan.weight_dtype, tmp,
                                progress=None if quiet else lambda i, n: count("writing FFN records, unit", i, n),
                                coactivation=order, split=records != "whole" and splittable)
        save_file(fixed_segment(spec, predictor, fl, fixed_dtype), str(tmp / "fixed.safetensors"))
        plan.save(tmp / "plan.json")
        stats.save(tmp / "profile.json")
        shutil.copyfile(predictor_path, tmp / "predictor.safetensors")
        steps = Steps(1, quiet)
        steps.start(f"compiling the decode and FFN modules for {profile.name}")
        modules = export_offload_modules(c, fl.bundle_layout(fl.n_clusters), fixed_dtype,
                                         predictor.layers[0].rank, plan.compute_threads, profile, tmp, dot)
        steps.done(modules["toolchain"])
        files = {n: sha256_file(tmp / n) for n in (*SMALL_FILES, modules["decode"], modules["ffn"])}
        sample: list[int] = []
        if spec.tokenizer is not None:
            from xpuc.runtime.tokenizer import XpucTokenizer

            tok = XpucTokenizer.from_source(spec.tokenizer)
            for n in tok.save(tmp):
                files[n] = sha256_file(tmp / n)
            sample = tok.encode("The cache keeps the hot neurons in memory and reads the others from flash.")
        entries = [ModuleEntry(name=role, file=modules[role], role=role, target=modules["target"],
                               mtriple=modules["mtriple"], toolchain=modules["toolchain"],
                               info={"threads": modules["threads"], "dot": modules["dot"]})
                   for role in ("decode", "ffn")]
        info = OffloadInfo(ffn_bytes=fl.file_bytes, fixed_dtype=fixed_dtype, predictor_rank=predictor.layers[0].rank,
                           fingerprint=fingerprint, sample_prompt=sample)
        manifest = Manifest(versions=versions(), device={"name": profile.name, "mtriple": profile.mtriple},
                            config=c.to_dict(), source={"model": str(model), "fingerprint": fingerprint},
                            modules=entries, params=[], weights_file="fixed.safetensors", files=files, kind="packed",
                            offload=dataclasses.asdict(info))
        (tmp / MANIFEST).write_text(manifest.to_json())
    return out


def load_offload_artifact(path):
    """Kept for callers of the compiler side: see :func:`xpuc.runtime.packed.load_packed`."""

    return load_packed(Path(path))
