"""GGML-quantized weights: the q4_0/q4_1/q8_0 kernels vs numpy, and the quantized decoder (dense prefill,
thresholded sparse decode) vs the numpy reference on the dequantized weights."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from support.models import random_weights, spec_from, tiny_config

from xpuc.compiler.reference import ReferenceModel
from xpuc.compiler.relax_model import EMBED_QUANT, export_model, param_arrays
from xpuc.compiler.sparse_quality import SparseReference
from xpuc.runtime.formats.bundle import activation
from xpuc.runtime.session import DecoderSession
from xpuc.schedules.linear_quant import (
    dequantize_matrix,
    dequantize_rows,
    embedding_quant,
    gate_up_act_quant,
    linear_quant,
    quantize_matrix,
    quantize_rows,
)
from xpuc.targets.profile import load_profile

TARGET = load_profile("host").cpu_target()


def _build(func):
    return tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=TARGET)["main"]


def _t(a):
    return tvm.runtime.tensor(np.ascontiguousarray(a))


@pytest.mark.parametrize("fmt", ["q4_0", "q4_1", "q8_0"])
def test_quantize_rows_round_trip_is_exact(fmt):
    w = np.random.default_rng(1).standard_normal((24, 96)).astype(np.float32)
    q = quantize_rows(w, fmt)
    back = dequantize_rows(q, fmt)
    assert np.array_equal(quantize_rows(back, fmt), q)  # a dequantized GGUF matrix keeps its exact values
    step = {"q4_0": 1 / 8, "q4_1": 1 / 15, "q8_0": 1 / 127}[fmt]
    assert np.abs(back - w).max() <= step * np.abs(w).max() * 1.01


@pytest.mark.parametrize("fmt", ["q4_0", "q4_1", "q8_0"])
def test_linear_and_embedding_kernels_match_numpy(fmt):
    rng = np.random.default_rng(2)
    K, N = 96, 40
    q = quantize_matrix(rng.standard_normal((N, K)).astype(np.float32), fmt)
    wd = dequantize_matrix(q, fmt)
    np.testing.assert_array_equal(wd, dequantize_rows(quantize_rows(dequantize_matrix(q, fmt), fmt), fmt))
    f = _build(linear_quant(K, N, fmt))
    for n in (1, 3):  # decode branch and prefill branch
        x = rng.standard_normal((1, n, K)).astype(np.float32)
        y = _t(np.zeros((1, n, N), np.float32))
        f(_t(x), _t(q), y)
        np.testing.assert_allclose(y.numpy(), x @ wd.T, rtol=1e-5, atol=1e-5)
    emb = _build(embedding_quant(N, K, fmt))
    ids = np.array([[0, N - 1, 7]], np.int32)
    h = _t(np.zeros((1, 3, K), np.float32))
    emb(_t(ids), _t(q), h)
    np.testing.assert_array_equal(h.numpy()[0], wd[ids[0]])


@pytest.mark.parametrize("kind", ["swiglu", "drelu"])
def test_gate_up_act_skips_exactly_the_neurons_below_threshold(kind):
    rng = np.random.default_rng(3)
    d, F = 64, 96
    q = quantize_matrix(rng.standard_normal((2 * F, d)).astype(np.float32) * 0.3, "q4_1")
    wd = dequantize_matrix(q, "q4_1")
    x = rng.standard_normal((1, 1, d)).astype(np.float32)
    g, u = x[0, 0] @ wd[:F].T, x[0, 0] @ wd[F:].T
    a = np.sort(np.abs(g / (1 + np.exp(-g))))
    thr = float(a[F * 2 // 5: F * 2 // 5 + 2].mean()) if kind == "swiglu" else 0.0  # between two neurons
    h = _t(np.zeros((1, 1, F), np.float32))
    _build(gate_up_act_quant(d, F, "q4_1", kind))(_t(x), _t(q), _t(np.array([thr], np.float32)), h)
    want = activation(kind, g, u, thr)
    np.testing.assert_allclose(h.numpy()[0, 0], want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    assert 0.3 < float((h.numpy() == 0).mean()) < 0.9  # the activation really removed neurons


def _dequantized_spec(spec, fmt):
    w = dict(spec.weights.items())
    for name, a in list(w.items()):
        f = EMBED_QUANT if name in ("embed_tokens", "lm_head") else fmt
        # matrices as the kernels see them; norms and biases are stored in fp16
        w[name] = dequantize_rows(quantize_rows(a, f), f) if a.ndim == 2 else a.astype(np.float16).astype(np.float32)
    return spec_from(spec.config, w)


@pytest.mark.parametrize("fmt,arch,tie,bias", [("q4_0", "llama", True, False), ("q4_1", "qwen2", False, True)])
def test_quantized_decoder_matches_reference_with_thresholds(fmt, arch, tie, bias):
    cfg = tiny_config(arch, "swiglu", tie=tie, bias=bias)
    spec = spec_from(cfg, random_weights(cfg, 5))
    mod, params = export_model(cfg, TARGET, quant=fmt)
    assert {d for _, _, d in params} >= {"uint8", "float32"}
    with TARGET:
        ex = tvm.compile(mod, target=TARGET)
    ref_spec = _dequantized_spec(spec, fmt)
    dense = ReferenceModel(ref_spec, "float32")
    ids = [int(t) for t in np.random.default_rng(0).integers(0, cfg.vocab_size, 21)]
    # per-layer thresholds that silence about a third of the neurons (from the prompt's activations)
    thresholds = [0.15, 0.2]
    arrays = param_arrays(spec, quant=fmt, thresholds=thresholds)
    sess = DecoderSession(ex, [tvm.runtime.tensor(arrays[n]) for n, _, _ in params], 64, 16)
    sparse = SparseReference(ref_spec, [0.0, 0.0], weight_dtype="float32")
    got, want = sess.prefill(ids), dense.forward(ids)[-1]  # prefill is dense, whatever the thresholds
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    sparse.forward(ids)
    sparse.thresholds = thresholds
    tok = int(np.argmax(want))
    for _ in range(4):
        got, want = sess.decode(tok), sparse.forward([tok])[-1]
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
        tok = int(np.argmax(want))
    assert 0.05 < 1 - float(np.mean(sparse.computed[-4 * cfg.num_layers:])) < 0.95
