"""The fp16-weight linear TIR kernels against numpy, for decode (1 token) and prefill (many)."""

from __future__ import annotations

import numpy as np
import pytest
import tvm

from xpuc.schedules.linear import largest_divisor, linear_fp16
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
    args = [tvm.runtime.tensor(x), tvm.runtime.tensor(w)] + ([tvm.runtime.tensor(b)] if bias else []) + [y]
    lib["main"](*args)
    ref = x @ w.astype(np.float32).T + (b.astype(np.float32) if bias else 0)
    np.testing.assert_allclose(y.numpy(), ref, rtol=1e-4, atol=1e-4)


def test_largest_divisor():
    assert largest_divisor(576, 16) == 16
    assert largest_divisor(100, 16) == 4
    assert largest_divisor(7, 8) == 1
