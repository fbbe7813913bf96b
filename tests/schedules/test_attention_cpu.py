"""xpuc's CPU attention kernels over TVM's paged KV cache, against numpy and against TVM's own CPU kernels (the
semantics they replace: outputs and the log2-domain ``lse`` the cache's state merge reads)."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm.relax.frontend.nn.llm._decode_kernels import _attention_decode_cpu
from tvm.relax.frontend.nn.llm._prefill_kernels import _attention_prefill_cpu, _attention_prefill_ragged_cpu

from xpuc.schedules.attention_cpu import (
    EMPTY_LSE,
    attention_decode_paged,
    attention_prefill_paged,
    attention_prefill_ragged,
)
from xpuc.targets.profile import load_profile

TARGET = load_profile("host").cpu_target()
H_KV, H_Q, D, PAGE = 2, 6, 32, 16
SM = 1 / np.sqrt(D)


def _build(func):
    return tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=TARGET)["main"]


def _t(a):
    return tvm.runtime.tensor(np.ascontiguousarray(a))


def reference(q, keys, vals, causal):
    """(n_q, h_q, d) outputs and log2-domain lse of each row over its visible keys (keys/vals: (n_kv, h_kv, d))."""
    n_q, n_kv = q.shape[0], keys.shape[0]
    out = np.zeros(q.shape, np.float64)
    lse = np.full(q.shape[:2], EMPTY_LSE)
    for i in range(n_q):
        seen = max(min(n_kv, n_kv - n_q + i + 1), 0) if causal else n_kv
        for h in range(H_Q):
            if seen == 0:
                continue
            s = keys[:seen, h // (H_Q // H_KV)] @ q[i, h].astype(np.float64) * SM * np.log2(np.e)
            p = np.exp2(s - s.max())
            out[i, h] = p @ vals[:seen, h // (H_Q // H_KV)] / p.sum()
            lse[i, h] = s.max() + np.log2(p.sum())
    return out, lse


def _ragged(func, q, k, v, causal):
    n_q, n_kv = len(q), len(k)
    out, lse = tvm.runtime.empty(q.shape, "float32"), tvm.runtime.empty(q.shape[:2], "float32")
    func(_t(q), _t(np.array([0, n_q], np.int32)), _t(k), _t(v), _t(np.array([0, n_kv], np.int32)),
         _t(np.arange(n_q, dtype=np.int32)), _t(np.zeros(1, np.int32)), out, lse, causal, 0, 1.0, 1e4, SM)
    return out.numpy(), lse.numpy()


@pytest.mark.parametrize("n_q,n_kv,causal", [(1, 1, 1), (19, 19, 1), (19, 19, 0), (5, 37, 1), (40, 40, 1)])
def test_ragged_prefill_matches_numpy_and_tvm(n_q, n_kv, causal):
    rng = np.random.default_rng(n_q * 100 + n_kv)
    q = rng.standard_normal((n_q, H_Q, D)).astype(np.float32)
    k, v = (rng.standard_normal((n_kv, H_KV, D)).astype(np.float32) for _ in range(2))
    out, lse = _ragged(_build(attention_prefill_ragged(H_KV, H_Q, D)), q, k, v, causal)
    want, want_lse = reference(q, k, v, causal)
    np.testing.assert_allclose(out, want, atol=2e-6)
    np.testing.assert_allclose(lse, want_lse, atol=2e-5)
    tvm_out, tvm_lse = _ragged(_build(_attention_prefill_ragged_cpu(H_KV, H_Q, D, D, "float32", {})), q, k, v,
                               causal)
    np.testing.assert_allclose(out, tvm_out, atol=2e-6)
    np.testing.assert_allclose(lse, tvm_lse, atol=2e-5)


def _paged_inputs(rng, n_q, n_kv):
    """A cache of shuffled pages holding ``n_kv`` positions, and those positions' keys and values in order."""
    n_pages = -(-n_kv // PAGE)
    pages = rng.standard_normal((n_pages + 3, 2, H_KV, PAGE, D)).astype(np.float32)
    table = rng.permutation(n_pages + 3)[:n_pages].astype(np.int32)
    keys = pages[table, 0].transpose(0, 2, 1, 3).reshape(-1, H_KV, D)[:n_kv]
    vals = pages[table, 1].transpose(0, 2, 1, 3).reshape(-1, H_KV, D)[:n_kv]
    last = np.array([n_kv - (n_pages - 1) * PAGE if n_pages else 0], np.int32)
    q = rng.standard_normal((n_q, H_Q, D)).astype(np.float32)
    return q, pages, table, last, keys, vals


@pytest.mark.parametrize("n_q,n_kv,causal", [(7, 40, 0), (7, 40, 1), (3, 16, 0), (2, 0, 0)])
def test_paged_prefill_matches_numpy_and_tvm(n_q, n_kv, causal):
    q, pages, table, last, keys, vals = _paged_inputs(np.random.default_rng(n_kv), n_q, n_kv)
    results = []
    for func in (attention_prefill_paged(H_KV, H_Q, D, PAGE),
                 _attention_prefill_cpu(H_KV, H_Q, D, "float32", False, {})):
        out, lse = tvm.runtime.empty(q.shape, "float32"), tvm.runtime.empty(q.shape[:2], "float32")
        _build(func)(_t(q), _t(np.array([0, n_q], np.int32)), _t(pages), _t(np.array([0, len(table)], np.int32)),
                     _t(table), _t(last), _t(np.zeros(1, np.int32)), _t(np.arange(n_q, dtype=np.int32)), out, lse,
                     causal, 0, 1.0, 1e4, SM)
        results.append((out.numpy(), lse.numpy()))
    want, want_lse = reference(q, keys, vals, causal)
    np.testing.assert_allclose(results[0][0], want, atol=2e-6)
    np.testing.assert_allclose(results[0][1], want_lse, atol=2e-5)
    np.testing.assert_allclose(results[0][1], results[1][1], atol=2e-5)


@pytest.mark.parametrize("n_kv", [1, 16, 17, 300])
def test_decode_matches_numpy_and_tvm(n_kv):
    q, pages, table, last, keys, vals = _paged_inputs(np.random.default_rng(n_kv), 1, n_kv)
    results = []
    for func in (attention_decode_paged(H_KV, H_Q, D, PAGE),
                 _attention_decode_cpu(H_KV, H_Q, D, "float32", False, {})):
        out, lse = tvm.runtime.empty(q.shape, "float32"), tvm.runtime.empty(q.shape[:2], "float32")
        _build(func)(_t(q), _t(pages), _t(np.array([0, len(table)], np.int32)), _t(table), _t(last),
                     _t(np.zeros(1, np.int32)), _t(np.zeros(1, np.int32)), out, lse, 0, 1.0, 1e4, SM)
        results.append((out.numpy(), lse.numpy()))
    want, want_lse = reference(q, keys, vals, False)
    np.testing.assert_allclose(results[0][0], want, atol=2e-6)
    np.testing.assert_allclose(results[0][0], results[1][0], atol=2e-6)
    np.testing.assert_allclose(results[0][1], results[1][1], atol=2e-5)


def test_rope_inside_the_kernel_is_refused():
    q = np.zeros((2, H_Q, D), np.float32)
    k = np.zeros((2, H_KV, D), np.float32)
    f = _build(attention_prefill_ragged(H_KV, H_Q, D))
    out, lse = tvm.runtime.empty(q.shape, "float32"), tvm.runtime.empty(q.shape[:2], "float32")
    with pytest.raises(Exception, match="RoPE applied before"):
        f(_t(q), _t(np.array([0, 2], np.int32)), _t(k), _t(k), _t(np.array([0, 2], np.int32)),
          _t(np.arange(2, dtype=np.int32)), _t(np.zeros(1, np.int32)), out, lse, 1, 1, 1.0, 1e4, SM)


def test_head_dimension_off_the_vector_width_is_refused():
    with pytest.raises(ValueError, match="multiple of 16"):
        attention_decode_paged(H_KV, H_Q, 24)
