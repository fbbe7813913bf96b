"""The decode GEMV, the prefill GEMM and the thresholded gate/up kernel with int8 dot products (x86 AVX-512 VNNI)
over GGUF blocks: against numpy on the int8-rounded activations, within int8 rounding of float32, and a decoder
built with them."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from support.gguf_blocks import random_rows
from support.models import random_weights, spec_from, tiny_config

from xpuc.compiler.relax_model import export_model, param_arrays
from xpuc.runtime.formats.bundle import activation, int8_activations
from xpuc.runtime.session import DecoderSession
from xpuc.schedules.int8_dot import int8_dot_isa
from xpuc.schedules.int8_gemm import GEMM_FORMATS
from xpuc.schedules.int8_gemv import INT8_FORMATS
from xpuc.schedules.lane_layout import LANE_FORMATS
from xpuc.schedules.linear_quant import dequantize_matrix, gate_up_act_quant, interleave_rows, linear_quant
from xpuc.targets.profile import load_profile

TARGET = load_profile("host").cpu_target()
pytestmark = pytest.mark.skipif(int8_dot_isa(TARGET) != "avx512vnni", reason="the int8 GEMV needs AVX-512 VNNI")


def _t(a):
    return tvm.runtime.tensor(np.ascontiguousarray(a))


def _build(func):
    return tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=TARGET)["main"]


@pytest.mark.parametrize("fmt", sorted(INT8_FORMATS))
@pytest.mark.parametrize("N", [48, 40])  # 40 (not a multiple of the GEMM's 16 rows) and q6_k: float32 prefill
def test_int8_gemv_and_gemm_are_the_product_with_int8_rounded_activations(fmt, N):
    rng = np.random.default_rng(5)
    K = 512 if fmt.endswith("_k") else 288  # two 256-value blocks; an odd number of 32-value blocks
    rows = random_rows(rng, fmt, N, K)
    storage = interleave_rows(rows, fmt, K, int8=True)  # N = 48: q4_0 / q4_1 / q5_0 / q8_0 lane by lane
    assert np.array_equal(storage, interleave_rows(rows, fmt, K)) == (N % 16 != 0 or fmt not in LANE_FORMATS)
    w = dequantize_matrix(storage, fmt, int8=True)
    f = _build(linear_quant(K, N, fmt, 16, True))
    for n in (1, 3, 13):  # GEMV; GEMM with one-token tiles only, and two 6-token tiles and one left
        x = (rng.standard_normal((1, n, K)) * rng.uniform(0.1, 3, (1, n, K))).astype(np.float32)
        x[0, :, 32:64] = 0  # an all-zero block: scale 0
        y = tvm.runtime.empty((1, n, N), "float32")
        f(_t(x), _t(storage), y)
        exact = x[0] @ w.T
        if n == 1 or (N % 16 == 0 and fmt in GEMM_FORMATS):
            want = np.stack([int8_activations(row) for row in x[0]]) @ w.T
            np.testing.assert_allclose(y.numpy()[0], want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
            assert np.abs(y.numpy()[0] - exact).max() < 0.02 * np.abs(exact).max()  # int8 rounding only
        else:
            np.testing.assert_allclose(y.numpy()[0], exact, rtol=1e-4, atol=1e-4 * np.abs(exact).max())


@pytest.mark.parametrize("fmt", ["q4_1", "q5_0"])
def test_int8_gate_up_skips_the_neurons_below_threshold(fmt):
    rng = np.random.default_rng(3)
    d, F = 64, 96
    storage = interleave_rows(random_rows(rng, fmt, 2 * F, d, scale=0.05), fmt, d, int8=True)  # lane by lane
    wd = dequantize_matrix(storage, fmt, int8=True)
    x = rng.standard_normal((1, 1, d)).astype(np.float32)
    xi = int8_activations(x[0, 0])
    g, u = wd[:F] @ xi, wd[F:] @ xi
    a = np.sort(np.abs(g / (1 + np.exp(-g))))
    thr = float(a[F * 2 // 5: F * 2 // 5 + 2].mean())  # between two neurons
    h = _t(np.zeros((1, 1, F), np.float32))
    _build(gate_up_act_quant(d, F, fmt, "swiglu", True))(_t(x), _t(storage), _t(np.array([thr], np.float32)), h)
    want = activation("swiglu", g, u, thr)
    np.testing.assert_allclose(h.numpy()[0, 0], want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    assert 0.3 < float((h.numpy() == 0).mean()) < 0.9


@pytest.mark.parametrize("vocab", [None, 272])  # 272: the tied embedding / LM head lane by lane too
def test_decoder_with_int8_gemvs_decodes_like_the_float32_one(vocab):
    cfg = tiny_config("llama", "swiglu", vocab=vocab)
    spec = spec_from(cfg, random_weights(cfg, 3))
    logits = []
    for int8 in (False, True):  # int8: the projections' and the embedding's blocks lane by lane where N % 16 == 0
        arrays = param_arrays(spec, quant="q4_0", int8=int8)
        mod, params = export_model(cfg, TARGET, quant="q4_0", int8=int8)
        ex = tvm.compile(mod, target=TARGET)
        sess = DecoderSession(ex, [tvm.runtime.tensor(arrays[n]) for n, _, _ in params], 64, 16)
        out = [sess.prefill([1, 5, 9])]
        for tok in (3, 7, 11):
            out.append(sess.decode(tok))
        logits.append(np.stack(out))
    f32, i8 = logits
    assert np.abs(i8 - f32).max() < 0.05 * np.abs(f32).max()
    assert not np.array_equal(i8, f32)  # the int8 kernels really ran
