"""ReplaceCPUAttention: Before/Expected modules (TVM's paged-KV-cache kernels -> xpuc's), what stays, and a decoder
built through the pipeline whose chunked prefill (ragged + paged attention, states merged) and decode match numpy."""

from __future__ import annotations

import numpy as np
import tvm
from support.models import random_weights, spec_from, tiny_config
from tvm.relax.frontend.nn.llm._decode_kernels import _attention_decode_cpu
from tvm.relax.frontend.nn.llm._prefill_kernels import _attention_prefill_cpu, _attention_prefill_ragged_cpu
from tvm.script import tirx as T

from xpuc.compiler.passes.cpu_attention import ReplaceCPUAttention
from xpuc.compiler.pipeline import build
from xpuc.compiler.reference import ReferenceModel
from xpuc.compiler.relax_model import export_model, param_arrays
from xpuc.runtime.session import DecoderSession
from xpuc.schedules.attention_cpu import attention_decode_paged, attention_prefill_paged, attention_prefill_ragged
from xpuc.targets.profile import load_profile

TARGET = load_profile("host").cpu_target()


@T.prim_func(s_tir=True)
def copy_rows(a: T.Buffer((4, 16), "float32"), b: T.Buffer((4, 16), "float32")):
    for i, j in T.grid(4, 16):
        with T.sblock("copy"):
            vi, vj = T.axis.remap("SS", [i, j])
            b[vi, vj] = a[vi, vj]


def _module(ragged, paged, decode, sliding):
    return tvm.IRModule({"batch_prefill_ragged_kv": ragged, "batch_prefill_paged_kv_cpu": paged,
                         "batch_decode_paged_kv_cpu": decode, "batch_decode_paged_kv_cpu_sliding_window": sliding,
                         "copy_rows": copy_rows})


def _public(func, symbol):
    return func.with_attr("global_symbol", symbol)


def test_the_cache_kernels_are_replaced_and_the_rest_stays():
    h_kv, h_q, d = 2, 4, 32
    sliding = _attention_decode_cpu(h_kv, h_q, d, "float32", True, {})
    before = _module(_attention_prefill_ragged_cpu(h_kv, h_q, d, d, "float32", {}),
                     _attention_prefill_cpu(h_kv, h_q, d, "float32", False, {}),
                     _attention_decode_cpu(h_kv, h_q, d, "float32", False, {}), sliding)
    expected = _module(_public(attention_prefill_ragged(h_kv, h_q, d), "batch_prefill_ragged_kv"),
                       _public(attention_prefill_paged(h_kv, h_q, d), "batch_prefill_paged_kv_cpu"),
                       _public(attention_decode_paged(h_kv, h_q, d), "batch_decode_paged_kv_cpu"), sliding)
    tvm.ir.assert_structural_equal(ReplaceCPUAttention()(before), expected)


def test_float16_caches_and_odd_head_dimensions_keep_tvms_kernels():
    for dtype, d in (("float16", 32), ("float32", 24)):
        before = tvm.IRModule({"batch_decode_paged_kv_cpu": _attention_decode_cpu(2, 4, d, dtype, False, {})})
        tvm.ir.assert_structural_equal(ReplaceCPUAttention()(before), before)


def test_decoder_through_the_pipeline_matches_numpy_over_chunked_prefill_and_decode():
    cfg = tiny_config("llama", "swiglu")
    spec = spec_from(cfg, random_weights(cfg, 7))
    mod, params = export_model(cfg, TARGET)
    ex = build(mod, TARGET)
    arrays = param_arrays(spec)
    sess = DecoderSession(ex, [tvm.runtime.tensor(arrays[n]) for n, _, _ in params], 64, prefill_chunk=8)
    ref = ReferenceModel(spec, "float16")
    ids = [int(t) for t in np.random.default_rng(1).integers(0, cfg.vocab_size, 21)]  # chunks of 8, 8 and 5
    got, want = sess.prefill(ids), ref.forward(ids)[-1]
    np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-3 * np.abs(want).max())
    tok = int(np.argmax(want))
    for _ in range(3):
        got, want = sess.decode(tok), ref.forward([tok])[-1]
        np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-3 * np.abs(want).max())
        tok = int(np.argmax(want))
