"""The GGML block formats of the dense kernels (q4_0 … q6_k): GEMV, prefill GEMM and embedding over blocks
as a GGUF file stores them, against the ``gguf`` package's dequantization."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from support.gguf_blocks import random_rows

from xpuc.schedules.linear_quant import (
    dequantize_matrix,
    embedding_quant,
    interleave_rows,
    linear_quant,
    quantized_shape,
)
from xpuc.schedules.quant_formats import BLOCKS, QUANTIZABLE, dequantize_rows, quantize_rows
from xpuc.targets.profile import load_profile

TARGET = load_profile("host").cpu_target()
def _build(func):
    return tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=TARGET)["main"]


def _t(a):
    return tvm.runtime.tensor(np.ascontiguousarray(a))


@pytest.mark.parametrize("fmt", sorted(BLOCKS))
@pytest.mark.parametrize("N", [24, 64])  # prefill tasks of 8 rows, and of 32 (two AVX-512 vectors)
def test_linear_over_gguf_blocks_matches_the_gguf_dequantization(fmt, N):
    rng = np.random.default_rng(3)
    K = 512
    rows = random_rows(rng, fmt, N, K)
    w = dequantize_rows(rows, fmt)  # the gguf package's (or llama.cpp-identical) reading of the bytes
    storage = interleave_rows(rows, fmt, K)
    assert storage.shape == quantized_shape(K, N, fmt)
    np.testing.assert_array_equal(dequantize_matrix(storage, fmt), w)
    f = _build(linear_quant(K, N, fmt))
    for n in (1, 3, 13):  # decode GEMV; prefill GEMM: one-token tiles only, two 6-token tiles and one left
        x = rng.standard_normal((1, n, K)).astype(np.float32)
        y = tvm.runtime.empty((1, n, N), "float32")
        f(_t(x), _t(storage), y)
        np.testing.assert_allclose(y.numpy(), x @ w.T, rtol=1e-4, atol=1e-4 * np.abs(x @ w.T).max())


@pytest.mark.parametrize("fmt", ["q5_0", "q4_k", "q6_k"])
def test_embedding_over_gguf_blocks_is_the_rows_dequantized(fmt):
    rng = np.random.default_rng(4)
    V, D = 16, 256
    rows = random_rows(rng, fmt, V, D)
    ids = np.array([[3, 0, 15, 7]], np.int32)
    h = tvm.runtime.empty((1, 4, D), "float32")
    _build(embedding_quant(V, D, fmt))(_t(ids), _t(interleave_rows(rows, fmt, D)), h)
    np.testing.assert_array_equal(h.numpy()[0], dequantize_rows(rows, fmt)[ids[0]])


@pytest.mark.parametrize("fmt", QUANTIZABLE)
def test_formats_xpuc_quantizes_into_come_back_within_their_step(fmt):
    w = np.random.default_rng(5).standard_normal((8, 64)).astype(np.float32)
    back = dequantize_rows(quantize_rows(w, fmt), fmt)
    step = {"q4_0": 2 / 15, "q4_1": 1 / 15, "q5_0": 2 / 31, "q8_0": 1 / 127}[fmt]
    assert np.abs(back - w).max() <= step * np.abs(w).max() * 1.01


def test_k_formats_are_kept_never_quantized_and_bad_rows_are_refused():
    with pytest.raises(ValueError, match="does not quantize into q4_k"):
        quantize_rows(np.zeros((1, 256), np.float32), "q4_k")
    with pytest.raises(ValueError, match="multiple of 256"):
        quantized_shape(896, 8, "q6_k")
    with pytest.raises(ValueError, match="expected"):
        interleave_rows(np.zeros((8, 100), np.uint8), "q5_0", 128)
