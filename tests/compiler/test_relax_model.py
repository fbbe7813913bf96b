"""Compiled Relax decoder vs the numpy reference: per layer type, each FFN kind, prefill and decode."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from support.models import random_weights, spec_from, tiny_config

from xpuc.compiler.reference import ReferenceModel, causal_attention, ffn, rms_norm, rope
from xpuc.compiler.relax_model import export_model, param_arrays
from xpuc.runtime.session import DecoderSession
from xpuc.targets.profile import load_profile


def _session(spec, max_context=128, chunk=16):
    target = load_profile("host").cpu_target()
    mod, params = export_model(spec.config, target)
    with target:
        ex = tvm.compile(mod, target=target)
    arrays = param_arrays(spec)
    return DecoderSession(ex, [tvm.runtime.tensor(arrays[n]) for n, _, _ in params], max_context, chunk)


@pytest.mark.parametrize("arch,kind,tie,bias", [("llama", "swiglu", True, False), ("qwen2", "swiglu", False, True),
                                                ("mistral", "reglu", False, False), ("llama", "drelu", True, False)])
def test_decoder_matches_reference(arch, kind, tie, bias):
    cfg = tiny_config(arch, kind, tie=tie, bias=bias)
    spec = spec_from(cfg, random_weights(cfg, 7))
    sess = _session(spec)
    ref = ReferenceModel(spec, weight_dtype="float16")
    rng = np.random.default_rng(0)
    ids = [int(t) for t in rng.integers(0, cfg.vocab_size, 37)]  # > one prefill chunk: chunking exercised
    got, want = sess.prefill(ids), ref.forward(ids)[-1]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    tok = int(np.argmax(want))
    for _ in range(6):
        got, want = sess.decode(tok), ref.forward([tok])[-1]
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
        tok = int(np.argmax(want))


def test_context_full_is_a_clear_error():
    from xpuc.runtime.errors import XpucError

    cfg = tiny_config()
    sess = _session(spec_from(cfg, random_weights(cfg)), max_context=32, chunk=16)
    sess.prefill(list(range(30)))
    with pytest.raises(XpucError, match="context full"):
        sess.prefill(list(range(5)))


def test_reference_building_blocks():
    """The reference's pieces against direct formulas."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 8)).astype(np.float32)
    w = rng.standard_normal(8).astype(np.float32)
    np.testing.assert_allclose(rms_norm(x, w, 0.0), x / np.sqrt((x**2).mean(-1, keepdims=True)) * w, rtol=1e-6)
    # RoPE at position 0 is the identity; it preserves norms
    q = rng.standard_normal((4, 2, 8)).astype(np.float32)
    np.testing.assert_allclose(rope(q, np.zeros(4), 1e4), q)
    r = rope(q, np.arange(4), 1e4)
    np.testing.assert_allclose(np.linalg.norm(r, axis=-1), np.linalg.norm(q, axis=-1), rtol=1e-5)
    # attention of one query over one key returns that value
    k = rng.standard_normal((1, 1, 8)).astype(np.float32)
    v = rng.standard_normal((1, 1, 8)).astype(np.float32)
    np.testing.assert_allclose(causal_attention(q[:1, :2], k, v, 0), np.repeat(v, 2, 1), rtol=1e-6)
    g, u, d = (rng.standard_normal(s).astype(np.float32) for s in [(5, 8), (5, 8), (8, 5)])
    h = np.maximum(x @ g.T, 0) * np.maximum(x @ u.T, 0)
    np.testing.assert_allclose(ffn(x, g, u, d, "drelu"), h @ d.T, rtol=1e-5)
