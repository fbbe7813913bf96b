"""Prefill in one module, decode in another: the KV cache handed over (the GPU/NPU -> CPU hand-off).

On a phone the prefill module is the GPU's; here its twin is built for the host CPU from the same builder
(`prefill_module`), so the hand-off itself — TVM's page-group export/import between two separately compiled
modules with their own caches — runs for real and decode must continue exactly as in one module.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import tvm
from support.models import random_weights, spec_from, tiny_config

from xpuc.compiler.relax_model import export_model, param_arrays
from xpuc.runtime.artifact import seal_manifest
from xpuc.runtime.errors import XpucError
from xpuc.runtime.session import DecoderSession, SplitSession
from xpuc.targets.profile import load_profile


def _session(spec, kernels="cpu", functions=("prefill", "decode", "create_paged_kv_cache")):
    target = load_profile("host").cpu_target()
    mod, params = export_model(spec.config, target, kernels=kernels, functions=functions)
    from xpuc.compiler.pipeline import build

    ex = build(mod, target, None, "test")
    arrays = param_arrays(spec, kernels=kernels)
    return DecoderSession(ex, [tvm.runtime.tensor(np.ascontiguousarray(arrays[n])) for n, _, _ in params], 96)


def test_split_session_decodes_like_one_module():
    cfg = tiny_config()
    spec = spec_from(cfg, random_weights(cfg, 3))
    single = _session(spec)
    split = SplitSession(_session(spec, "generic", ("prefill", "create_paged_kv_cache")), _session(spec))
    ids = [int(t) for t in np.random.default_rng(0).integers(0, cfg.vocab_size, 37)]  # 3 pages, the last partial
    a, b = single.prefill(ids), split.prefill(ids)
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4 * np.abs(a).max())
    st = split.last_handoff
    head_dim = cfg.head_dim
    assert (st.tokens, st.layers) == (37, cfg.num_layers)
    assert st.bytes == cfg.num_layers * 3 * 2 * cfg.num_kv_heads * 16 * head_dim * 4  # fp32 pages of 16 tokens
    assert split.position == 37 and split.prefill_session.position == 0  # the prefill cache was freed
    tok = int(np.argmax(a))
    for _ in range(5):  # decode reads the handed-over pages: any lost or misplaced entry changes the logits
        a, b = single.decode(tok), split.decode(tok)
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4 * np.abs(a).max())
        tok = int(np.argmax(a))
    split.reset()  # a second prompt starts from a clean sequence on both sides
    np.testing.assert_allclose(split.prefill(ids[:20]), single_prefill(spec, ids[:20]), rtol=1e-4, atol=1e-3)


def single_prefill(spec, ids):
    return _session(spec).prefill(ids)


def test_handoff_between_different_layouts_is_a_clear_error():
    cfg = tiny_config()
    other = dataclasses.replace(cfg, num_layers=cfg.num_layers + 1)
    src = _session(spec_from(other, random_weights(other)), "generic", ("prefill", "create_paged_kv_cache"))
    dst = _session(spec_from(cfg, random_weights(cfg)))
    src.prefill([1, 2, 3])
    with pytest.raises(XpucError, match="different layouts"):
        dst.take_kv_from(src)


def test_engine_runs_a_separate_prefill_module_and_hands_off(tmp_path, tiny_gguf):
    """An artifact with a prefill module the host can drive (its CPU twin): the engine splits and agrees."""
    from xpuc.compiler.build import compile_model, prefill_module
    from xpuc.compiler.frontends import load_model
    from xpuc.runtime.artifact import sha256_file
    from xpuc.runtime.engine import Engine

    gguf, _, _ = tiny_gguf
    art = compile_model(gguf, tmp_path / "art", quiet=True)
    plain = Engine(art).generate_ids([5, 9, 14, 3, 7] * 4, 6)
    profile = load_profile("host")
    entry = prefill_module(load_model(gguf), profile.cpu_target(), profile.mtriple, profile.toolchain(), art, None,
                           name="prefill_twin")
    m = json.loads((art / "manifest.json").read_text())
    m["modules"].append(dataclasses.asdict(entry))
    for f in (entry.file, entry.weights):
        m["files"][f] = sha256_file(art / f)
    (art / "manifest.json").write_text(json.dumps(seal_manifest(m)))
    eng = Engine(art)
    assert isinstance(eng.session, SplitSession) and eng.prefill_on == "prefill_twin"
    res = eng.generate_ids([5, 9, 14, 3, 7] * 4, 6)
    assert res.prefill_on == "prefill_twin" and res.handoff.tokens == 20
    np.testing.assert_allclose(res.first_logits, plain.first_logits, rtol=1e-3, atol=1e-3)
    assert res.tokens == plain.tokens


def test_prefill_module_without_its_device_falls_back_to_the_cpu():
    from xpuc.runtime.artifact import ModuleEntry
    from xpuc.runtime.engine import prefill_device

    target = tvm.target.Target({"kind": "cuda", "arch": "sm_90"}, host=load_profile("host").cpu_target())
    entry = ModuleEntry("prefill_gpu", "prefill_gpu.so", "prefill", str(target), load_profile("host").mtriple, "x")
    dev, why = prefill_device(entry)
    if tvm.cuda(0).exist:
        pytest.skip("this machine has a CUDA device")
    assert dev is None and "no cuda device" in why
    android = ModuleEntry("prefill_gpu", "prefill_gpu.so", "prefill", "opencl", "aarch64-linux-android", "x")
    assert prefill_device(android) == (None, "prefill_gpu is built for aarch64-linux-android")
