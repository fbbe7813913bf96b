"""The column-stored projection (activation sparsity at decode) against numpy: every format, dense prefill,
thresholded decode, tiles and leftovers of the token tiles."""

from __future__ import annotations

import numpy as np
import pytest
import tvm

from xpuc.schedules.linear_cols import (
    COLUMN_FORMATS,
    cols_shape,
    column_format,
    column_tile,
    dequantize_cols,
    linear_cols,
    quantize_cols,
)
from xpuc.targets.profile import load_profile


@pytest.fixture(scope="module")
def target():
    return load_profile("host").cpu_target()


def _run(target, func, x, w, thr):
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=target)
    n_out = w.shape[1] * w.shape[2] * 32
    y = tvm.runtime.tensor(np.zeros((1, x.shape[1], n_out), np.float32))
    lib["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(w), tvm.runtime.tensor(np.array([thr], np.float32)), y)
    return y.numpy()


def test_column_tile_is_even_and_bounded():
    assert column_tile(576) == 288 and column_tile(896) == 448
    assert column_tile(1152) == 288  # 4 tiles, not 3
    assert column_tile(9728) == 256  # 38 tiles: 19 (odd) would be 512 rows each
    assert column_tile(96) == 96  # 3 blocks: no even split
    for n in (32, 96, 576, 960, 3072, 9728):
        t = column_tile(n)
        assert n % t == 0 and t % 32 == 0 and t <= 512
    with pytest.raises(ValueError, match="multiple of 32"):
        column_tile(100)


def test_column_format_keeps_bits():
    assert column_format("q4_k") == "q4_1" and column_format("q5_k") == "q5_0"
    assert column_format("q6_k") == "q8_0" and column_format(None) == "q8_0"
    assert all(column_format(f) in COLUMN_FORMATS for f in (None, "q4_0", "q4_1", "q5_0", "q8_0", "q4_k", "q6_k"))


@pytest.mark.parametrize("fmt", COLUMN_FORMATS)
def test_quantize_cols_roundtrip(fmt):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((96, 40)).astype(np.float32)
    data = quantize_cols(w, fmt)
    assert data.shape == cols_shape(40, 96, fmt)
    back = dequantize_cols(data, fmt)
    # column k's blocks run along the output rows: requantizing the dequantized matrix gives the same bytes
    np.testing.assert_array_equal(quantize_cols(back, fmt), data)
    assert np.abs(back - w).max() < (0.02 if fmt == "q8_0" else 0.5)


@pytest.mark.parametrize("fmt", COLUMN_FORMATS)
@pytest.mark.parametrize("K,N", [(64, 96), (200, 576)])
@pytest.mark.parametrize("tokens", [1, 6, 13])
def test_dense_matches_numpy(target, fmt, K, N, tokens):
    rng = np.random.default_rng(K + N + tokens)
    data = quantize_cols(rng.standard_normal((N, K)).astype(np.float32) * 0.1, fmt)
    w = dequantize_cols(data, fmt)
    x = rng.standard_normal((1, tokens, K)).astype(np.float32)
    y = _run(target, linear_cols(K, N, fmt), x, data, -1.0)  # thr < 0: every input kept
    np.testing.assert_allclose(y, x @ w.T, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("fmt", ["q4_1", "q8_0"])
@pytest.mark.parametrize("keep", [0.0, 0.37, 1.0])
def test_decode_skips_small_inputs(target, fmt, keep):
    K, N = 256, 960
    rng = np.random.default_rng(7)
    data = quantize_cols(rng.standard_normal((N, K)).astype(np.float32) * 0.1, fmt)
    w = dequantize_cols(data, fmt)
    x = rng.standard_normal((1, 1, K)).astype(np.float32)
    thr = float(np.quantile(np.abs(x), 1 - keep)) if 0 < keep < 1 else (np.abs(x).max() + 1 if keep == 0 else -1.0)
    y = _run(target, linear_cols(K, N, fmt), x, data, thr)
    xs = np.where(np.abs(x) > thr, x, 0)
    np.testing.assert_allclose(y, xs @ w.T, rtol=1e-4, atol=1e-4)
    if keep == 0.0:
        assert not y.any()
    elif keep < 1:  # the thresholded product differs from the dense one
        assert np.abs(y - x @ w.T).max() > 1e-2
