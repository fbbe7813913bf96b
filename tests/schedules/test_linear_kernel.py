"""The fp16-weight linear TIR kernels against numpy, for decode (1 token) and prefill (many)."""

from __future__ import annotations

import numpy as np
import pytest
import tvm

from xpuc.schedules.linear import embedding_fp16, largest_divisor, linear_fp16, pack_rows, unpack_rows
from xpuc.targets.profile import load_profile


@pytest.fixture(scope="module")
def target():
    return load_profile("host").cpu_target()


@pytest.mark.parametrize("K,N,bias", [(64, 96, False), (576, 1536, False), (96, 40, True), (24, 12, True),
                                      (100, 7, False)])
@pytest.mark.parametrize("tokens", [1, 5])
def test_linear_matches_numpy(target, K, N, bias, tokens):
    f = linear_fp16(K, N, bias)
    lib = tvm.compile(tvm.IRModule({"main": f.with_attr("global_symbol", "main")}), target=target)
    rng = np.random.default_rng(K + N)
    x = rng.standard_normal((1, tokens, K)).astype(np.float32)
    w = (rng.standard_normal((N, K)) * 0.1).astype(np.float16)
    b = rng.standard_normal(N).astype(np.float16)
    y = tvm.runtime.tensor(np.zeros((1, tokens, N), np.float32))
    args = [tvm.runtime.tensor(x), tvm.runtime.tensor(pack_rows(w))] + ([tvm.runtime.tensor(b)] if bias else []) + [y]
    lib["main"](*args)
    ref = x @ w.astype(np.float32).T + (b.astype(np.float32) if bias else 0)
    np.testing.assert_allclose(y.numpy(), ref, rtol=1e-4, atol=1e-4)


def test_largest_divisor():
    assert largest_divisor(576, 16) == 16
    assert largest_divisor(100, 16) == 4
    assert largest_divisor(7, 8) == 1


@pytest.mark.parametrize("vocab,hidden", [(300, 64), (49152 // 64, 576), (7, 24)])
def test_embedding_gathers_packed_rows(target, vocab, hidden):
    f = embedding_fp16(vocab, hidden)
    lib = tvm.compile(tvm.IRModule({"main": f.with_attr("global_symbol", "main")}), target=target)
    rng = np.random.default_rng(vocab)
    w = rng.standard_normal((vocab, hidden)).astype(np.float16)
    ids = rng.integers(0, vocab, (1, 9)).astype(np.int32)
    ids[0, :2] = [0, vocab - 1]
    y = tvm.runtime.tensor(np.zeros((1, 9, hidden), np.float32))
    lib["main"](tvm.runtime.tensor(ids), tvm.runtime.tensor(pack_rows(w)), y)
    np.testing.assert_array_equal(y.numpy()[0], w[ids[0]].astype(np.float32))


def test_pack_roundtrip():
    w = np.arange(40 * 48, dtype=np.float16).reshape(40, 48)
    p = pack_rows(w)
    assert p.shape == (5, 3, 8, 16)
    np.testing.assert_array_equal(p[1, 2, 3], w[1 * 8 + 3, 2 * 16:3 * 16])
    np.testing.assert_array_equal(unpack_rows(p), w)
