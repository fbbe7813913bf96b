"""Attention kernels for the CPU over TVM's paged KV cache, in parallel and vectorized.

TVM's own CPU kernels for its paged KV cache (``relax.frontend.nn.llm``) run on one thread with scalar loops;
on SmolLM2-135M they took 72 % of a 512-token prefill and 60 % of a decode step at 512 tokens of context. These
kernels have the same signatures and semantics, so :class:`~xpuc.compiler.passes.cpu_attention.
ReplaceCPUAttention` swaps them in:

* :func:`attention_prefill_ragged` — the prompt chunk's queries against its own keys (causal or not),
* :func:`attention_prefill_paged` — the chunk's queries against the keys already in the cache's pages,
* :func:`attention_decode_paged` — one query per sequence against its pages.

Each (query row, head) pair is one parallel task: the row's scores ``s_j = q . k_j`` (vectorized over the head
dimension), their maximum, ``exp2`` of the scaled scores (a vectorized polynomial, :func:`exp2_approx`), and the
weighted sum of the value rows. As in TVM's kernels, scores are in the log2 domain (``q . k * sm_scale *
log2(e)``) and ``lse`` is ``max + log2(sum)``, which is what the cache's state merge expects; a row that sees
no key gets zeros and ``lse = -5e4``. RoPE must be applied before the cache (``RopeMode.NORMAL``, what xpuc's
decoders use): the kernels assert ``rotary_mode == 0``.
"""

from __future__ import annotations

import math
from functools import cache

from tvm import tirx
from tvm.script import tirx as T

__all__ = ["attention_decode_paged", "attention_prefill_paged", "attention_prefill_ragged", "exp2_approx"]

LOG2E = math.log2(math.e)
EMPTY_LSE = -5e4  # TVM's kernels' lse of a row with no visible key
LANES = 16
# Taylor coefficients of 2^f = e^(f ln 2) on f in [-0.5, 0.5]: relative error < 2e-7
_EXP2_COEFFS = tuple(math.log(2) ** k / math.factorial(k) for k in range(7))


def exp2_approx(x):
    """TIR expression of ``2 ** x`` (float32, x <= 0 here) that vectorizes: ``2^round(x)`` built from its exponent
    bits times a degree-6 polynomial of the remainder; 0 below ``2^-126``."""
    xc = T.max(x, T.float32(-126.0))
    n = T.round(xc)
    f = xc - n
    p = T.float32(_EXP2_COEFFS[6])
    for c in reversed(_EXP2_COEFFS[:6]):
        p = p * f + T.float32(c)
    scale = T.reinterpret("float32", T.shift_left(T.Cast("int32", n) + T.int32(127), T.int32(23)))
    return T.Select(x < T.float32(-126.0), T.float32(0), p * scale)


def _row_attention(d: int, key, value):
    """Macro ``attend(q, qi, h, kv, n_keys, sm, s, acc, out, oi, lse)``: output row ``out[oi, h]`` and
    ``lse[oi, h]`` of query ``q[qi, h]`` over keys ``0 .. n_keys-1``, read with ``key(kv, j, l)`` /
    ``value(kv, j, l)`` (``kv``: a tuple of the buffers and offsets they need). ``s`` holds the row's scores,
    ``acc`` is scratch of ``d`` + 2 x ``LANES`` floats."""
    if d % LANES:
        raise ValueError(f"head dimension {d} is not a multiple of {LANES}")

    @T.macro
    def attend(q, qi, h, kv, n_keys, sm, s, acc, out, oi, lse):
        if n_keys <= 0:
            for l in T.vectorized(d):
                out[oi, h, l] = T.float32(0)
            lse[oi, h] = T.float32(EMPTY_LSE)
        else:
            # scores and their maximum (acc[d]: the running maximum)
            acc[d] = T.float32(-3.0e38)
            for j in range(n_keys):
                for l in T.vectorized(LANES):
                    acc[l] = q[qi, h, l] * key(kv, j, l)
                for c in T.unroll(1, d // LANES):
                    for l in T.vectorized(LANES):
                        acc[l] = acc[l] + q[qi, h, c * LANES + l] * key(kv, j, c * LANES + l)
                for l in T.vectorized(8):
                    acc[l] = acc[l] + acc[l + 8]
                for l in T.vectorized(4):
                    acc[l] = acc[l] + acc[l + 4]
                for l in T.vectorized(2):
                    acc[l] = acc[l] + acc[l + 2]
                s[j] = (acc[0] + acc[1]) * sm
                acc[d] = T.max(acc[d], s[j])
            # exp2 of the shifted scores, and their sum in LANES partial sums (acc[d + LANES ...])
            for l in T.vectorized(LANES):
                acc[d + LANES + l] = T.float32(0)
            for jb in range(n_keys // LANES):
                for l in T.vectorized(LANES):
                    s[jb * LANES + l] = exp2_approx(s[jb * LANES + l] - acc[d])
                    acc[d + LANES + l] = acc[d + LANES + l] + s[jb * LANES + l]
            for j in range(n_keys // LANES * LANES, n_keys):
                s[j] = exp2_approx(s[j] - acc[d])
                acc[d + LANES] = acc[d + LANES] + s[j]
            for l in T.vectorized(8):
                acc[d + LANES + l] = acc[d + LANES + l] + acc[d + LANES + l + 8]
            for l in T.vectorized(4):
                acc[d + LANES + l] = acc[d + LANES + l] + acc[d + LANES + l + 4]
            for l in T.vectorized(2):
                acc[d + LANES + l] = acc[d + LANES + l] + acc[d + LANES + l + 2]
            acc[d + LANES] = acc[d + LANES] + acc[d + LANES + 1]
            # the weighted sum of the value rows
            for l in T.vectorized(d):
                acc[l] = T.float32(0)
            for j in range(n_keys):
                for l in T.vectorized(d):
                    acc[l] = acc[l] + s[j] * value(kv, j, l)
            for l in T.vectorized(d):
                out[oi, h, l] = acc[l] / acc[d + LANES]
            lse[oi, h] = acc[d] + T.log2(acc[d + LANES])

    return attend


def _ragged_key(kv, j, l):
    return kv[0][kv[2] + j, kv[3], l]


def _ragged_value(kv, j, l):
    return kv[1][kv[2] + j, kv[3], l]


def _paged_at(part: int, page_size: int):
    def at(kv, j, l):
        pages, page_values, first = kv[0], kv[1], kv[2]
        return pages[page_values[first + j // page_size], part, kv[3], j % page_size, l]

    return at


def _visible(causal, row, kv_len, qo_len):
    """Keys a query row sees: all ``kv_len``, or with ``causal`` those up to its own position (TVM's mask)."""
    return T.if_then_else(causal > 0, T.max(T.min(kv_len, kv_len - qo_len + row + 1), 0), kv_len)


@cache
def attention_prefill_ragged(h_kv: int, h_q: int, d: int) -> tirx.PrimFunc:
    """The signature of TVM's ``batch_prefill_ragged_kv`` (CPU): ``q (total, h_q, d)``, ``k``/``v (total_kv,
    h_kv, d)``, float32, rows split into sequences by ``q_indptr`` / ``kv_indptr``."""
    group = h_q // h_kv
    attend = _row_attention(d, _ragged_key, _ragged_value)

    @T.prim_func(private=True, s_tir=True)
    def prefill_ragged(var_q: T.handle, var_q_indptr: T.handle, var_k: T.handle, var_v: T.handle,
                       var_kv_indptr: T.handle, var_q_rope_position: T.handle, var_k_rope_pos_offset: T.handle,
                       var_output: T.handle, var_lse: T.handle, causal: T.int32, rotary_mode: T.int32,
                       rope_scale: T.float32, rope_theta: T.float32, sm_scale: T.float32):
        T.func_attr({"tir.noalias": True, "tirx.is_scheduled": True})
        batch_size = T.int32()
        qo_len = T.int32()
        kv_len = T.int32()
        q = T.match_buffer(var_q, (qo_len, h_q, d), "float32")
        q_indptr = T.match_buffer(var_q_indptr, (batch_size + 1,), "int32", elem_offset=T.int32())
        k = T.match_buffer(var_k, (kv_len, h_kv, d), "float32")
        v = T.match_buffer(var_v, (kv_len, h_kv, d), "float32")
        kv_indptr = T.match_buffer(var_kv_indptr, (batch_size + 1,), "int32", elem_offset=T.int32())
        T.match_buffer(var_k_rope_pos_offset, (batch_size,), "int32", elem_offset=T.int32())  # unused (no RoPE)
        output = T.match_buffer(var_output, (qo_len, h_q, d), "float32")
        lse = T.match_buffer(var_lse, (qo_len, h_q), "float32")
        assert rotary_mode == 0, "xpuc's CPU attention takes RoPE applied before the KV cache"
        with T.sblock("root"):
            T.reads()
            T.writes()
            for b in range(batch_size):
                for task in T.parallel((q_indptr[b + 1] - q_indptr[b]) * h_q):
                    s = T.alloc_buffer((kv_indptr[b + 1] - kv_indptr[b] + LANES,), "float32", scope="global")
                    acc = T.alloc_buffer((d + 2 * LANES,), "float32", scope="global")
                    row = task // h_q
                    h = task % h_q
                    n_q = q_indptr[b + 1] - q_indptr[b]
                    n_kv = kv_indptr[b + 1] - kv_indptr[b]
                    attend(q, q_indptr[b] + row, h, (k, v, kv_indptr[b], h // group), _visible(causal, row, n_kv, n_q),
                           sm_scale * T.float32(LOG2E), s, acc, output, q_indptr[b] + row, lse)

    return prefill_ragged


@cache
def attention_prefill_paged(h_kv: int, h_q: int, d: int, page_size: int = 16) -> tirx.PrimFunc:
    """The signature of TVM's ``batch_prefill_paged_kv_cpu``: ``q (total, h_q, d)`` against ``pages
    (max_pages, 2, h_kv, page_size, d)``, float32, no sliding window."""
    group = h_q // h_kv
    attend = _row_attention(d, _paged_at(0, page_size), _paged_at(1, page_size))

    @T.prim_func(private=True, s_tir=True)
    def prefill_paged(var_q: T.handle, var_q_indptr: T.handle, var_pages: T.handle, var_page_indptr: T.handle,
                      var_page_values: T.handle, var_length_info: T.handle, var_k_rope_pos_offset: T.handle,
                      var_q_rope_position: T.handle, var_output: T.handle, var_lse: T.handle, causal: T.int32,
                      rotary_mode: T.int32, rope_scale: T.float32, rope_theta: T.float32, sm_scale: T.float32):
        T.func_attr({"tir.noalias": True, "tirx.is_scheduled": True})
        batch_size = T.int32()
        total_len = T.int32()
        nnz_pages = T.int32()
        max_num_pages = T.int32()
        q = T.match_buffer(var_q, (total_len, h_q, d), "float32")
        q_indptr = T.match_buffer(var_q_indptr, (batch_size + 1,), "int32", elem_offset=T.int32())
        pages = T.match_buffer(var_pages, (max_num_pages, 2, h_kv, page_size, d), "float32")
        page_indptr = T.match_buffer(var_page_indptr, (batch_size + 1,), "int32", elem_offset=T.int32())
        page_values = T.match_buffer(var_page_values, (nnz_pages,), "int32", elem_offset=T.int32())
        length_info = T.match_buffer(var_length_info, (batch_size,), "int32", elem_offset=T.int32())
        output = T.match_buffer(var_output, (total_len, h_q, d), "float32")
        lse = T.match_buffer(var_lse, (total_len, h_q), "float32")
        assert rotary_mode == 0, "xpuc's CPU attention takes RoPE applied before the KV cache"
        with T.sblock("root"):
            T.reads()
            T.writes()
            for b in range(batch_size):
                for task in T.parallel((q_indptr[b + 1] - q_indptr[b]) * h_q):
                    n_pages = page_indptr[b + 1] - page_indptr[b]
                    n_kv = T.if_then_else(n_pages > 0, (n_pages - 1) * page_size + length_info[b], 0)
                    s = T.alloc_buffer((max_num_pages * page_size + LANES,), "float32", scope="global")
                    acc = T.alloc_buffer((d + 2 * LANES,), "float32", scope="global")
                    row = task // h_q
                    h = task % h_q
                    attend(q, q_indptr[b] + row, h, (pages, page_values, page_indptr[b], h // group),
                           _visible(causal, row, n_kv, q_indptr[b + 1] - q_indptr[b]), sm_scale * T.float32(LOG2E),
                           s, acc, output, q_indptr[b] + row, lse)

    return prefill_paged


@cache
def attention_decode_paged(h_kv: int, h_q: int, d: int, page_size: int = 16) -> tirx.PrimFunc:
    """The signature of TVM's ``batch_decode_paged_kv`` (CPU): one query ``q (batch, h_q, d)`` per sequence
    against its pages, float32, no sliding window."""
    group = h_q // h_kv
    attend = _row_attention(d, _paged_at(0, page_size), _paged_at(1, page_size))

    @T.prim_func(private=True, s_tir=True)
    def decode_paged(var_q: T.handle, var_pages: T.handle, var_page_indptr: T.handle, var_page_values: T.handle,
                     var_length_info: T.handle, var_k_rope_pos_offset: T.handle, var_q_rope_position: T.handle,
                     var_output: T.handle, var_lse: T.handle, rotary_mode: T.int32, rope_scale: T.float32,
                     rope_theta: T.float32, sm_scale: T.float32):
        T.func_attr({"tir.noalias": True, "tirx.is_scheduled": True})
        B = T.int32()
        nnz_pages = T.int32()
        max_num_pages = T.int32()
        q = T.match_buffer(var_q, (B, h_q, d), "float32")
        pages = T.match_buffer(var_pages, (max_num_pages, 2, h_kv, page_size, d), "float32")
        page_indptr = T.match_buffer(var_page_indptr, (B + 1,), "int32", elem_offset=T.int32())
        page_values = T.match_buffer(var_page_values, (nnz_pages,), "int32", elem_offset=T.int32())
        length_info = T.match_buffer(var_length_info, (B,), "int32", elem_offset=T.int32())
        output = T.match_buffer(var_output, (B, h_q, d), "float32")
        lse = T.match_buffer(var_lse, (B, h_q), "float32")
        assert rotary_mode == 0, "xpuc's CPU attention takes RoPE applied before the KV cache"
        with T.sblock("root"):
            T.reads()
            T.writes()
            for task in T.parallel(B * h_q):
                b = task // h_q
                h = task % h_q
                s = T.alloc_buffer((max_num_pages * page_size + LANES,), "float32", scope="global")
                acc = T.alloc_buffer((d + 2 * LANES,), "float32", scope="global")
                n_pages = page_indptr[b + 1] - page_indptr[b]
                attend(q, b, h, (pages, page_values, page_indptr[b], h // group),
                       T.if_then_else(n_pages > 0, (n_pages - 1) * page_size + length_info[b], 0),
                       sm_scale * T.float32(LOG2E), s, acc, output, b, lse)

    return decode_paged
