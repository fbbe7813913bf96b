"""The compiled modules of a packed model, built ahead of time for the device (`xpuc pack`).

Two libraries, loaded by the runtime with TVM's runtime library only:

``decode.so``  a Relax VM executable over TVM's paged KV cache (the compiled decoder's attention kernels):

    embed(ids[1, s], table) -> h[1, s, d]
    layer(h, ys[m, 1, s, d], yw[m], kv, layer_id, attn_norm, qkv[, qkv_bias], o, ffn_norm)
        -> (h', x[s * d], kv)             h' = h1 + attention(norm(h1)), h1 = h + sum_j yw[j] * ys[j]
    layer_predict(... the same ..., w1, b1, w2, b2, thr) -> (h', x, cluster_mask[n_clusters], kv)
    predict(x[d], w1, b1, w2, b2, thr) -> cluster_mask      (an expert's predictor)
    pre_norm(h, ys, yw, ffn_norm) -> x[d]          (prefetch: the FFN input guessed before attention)
    route(x[s * d], router[E, d]) -> (experts[s, k] int32, weights[s, k])   (MoE: Mixtral's top-k softmax)
    head(h, ys, yw, final_norm, head) -> logits[1, 1, vocab]   (the last token)
    decode_resident(ids[1, 1], kv, table, final_norm, head, pool, layers) -> (logits, kv)
        one token through every layer in one call, each layer's FFN by the fused neuron-cluster kernel over all
        of its clusters, read in place from the neuron cache's pool (``layers[i]``: attn_norm, qkv, o,
        ffn_norm, thr, slots[n_clusters][, qkv_bias]); for dense models whose FFN is wholly in memory and
        computed in full (every unit's clusters expected to fire), where the per-layer calls and their Python
        glue would be all that stands between the packed model and the compiled decoder
    create_paged_kv_cache(...)

    One function serves every layer: the layer's weights and its KV-cache layer id are arguments. The FFN
    output of a layer comes back as ``m`` weighted parts (MoE experts, cache waves) and is added at the start
    of the next call, so that the runtime never adds arrays itself.

``ffn.so``     the neuron-cluster FFN kernels of the flash layout (``fused``, ``dense``, ``gate``, ``updown``
               over a pool of any number of cluster slots) and ``dequant`` (records -> float32, prefill).

The predictor's ``w2``/``b2`` rows are stored in the flash file's neuron order, so cluster ``c``'s neurons are
rows ``c * C ... c * C + C - 1`` and the mask is a max over each group.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tvm import te
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import op
from tvm.relax.frontend.nn.llm.kv_cache import PagedKVCache
from tvm.script import tirx as T

from xpuc.compiler.passes.cpu_attention import ReplaceCPUAttention
from xpuc.compiler.pipeline import simd_lanes
from xpuc.compiler.relax_model import paged_kv_cache
from xpuc.runtime.errors import XpucError
from xpuc.runtime.formats.arch import ArchConfig
from xpuc.schedules.linear import embedding_fp16, linear_fp16, pack_rows, packed_shape
from xpuc.schedules.linear_quant import embedding_quant, linear_quant, quantize_matrix, quantized_shape
from xpuc.schedules.sparse_dequant import dequantize_kernel
from xpuc.schedules.sparse_ffn import int8_dot_available, int8_dot_isa, sparse_ffn_kernel

DECODE_LIB = "decode.so"
EMBED_QUANT = "q8_0"  # embedding / LM head format when the fixed segment is quantized (as `compile --quantize`)
FFN_LIB = "ffn.so"
F32 = "float32"


def matrix_spec(out_f: int, in_f: int, fmt: str) -> nn.spec.Tensor:
    """Storage of an (out, in) matrix for the GEMV kernels: fp16 row-block packed, or GGML blocks."""
    if fmt == "float16":
        return nn.spec.Tensor(list(packed_shape(in_f, out_f)), "float16")
    return nn.spec.Tensor(list(quantized_shape(in_f, out_f, fmt)), "uint8")


def matrix_storage(w: np.ndarray, fmt: str) -> np.ndarray:
    """The array :func:`matrix_spec` describes, from an (out, in) float matrix."""
    return pack_rows(w.astype(np.float16)) if fmt == "float16" else quantize_matrix(w, fmt)


def embed_format(fixed_dtype: str) -> str:
    """Storage of the embedding and LM head for a fixed segment in ``fixed_dtype``."""
    return "float16" if fixed_dtype == "float16" else EMBED_QUANT


def _linear(x: nn.Tensor, w: nn.Tensor, in_f: int, out_f: int, fmt: str, bias: nn.Tensor | None = None,
            lanes: int = 16):
    s = x.shape[1]
    out = nn.Tensor.placeholder([1, s, out_f], F32)
    if fmt == "float16":
        func = linear_fp16(in_f, out_f, bias is not None)
        args = [x, w] + ([bias] if bias is not None else [])
        return op.tensor_ir_op(func, f"linear_{in_f}x{out_f}" + ("_bias" if bias is not None else ""), args, out)
    y = op.tensor_ir_op(linear_quant(in_f, out_f, fmt, lanes), f"linear_{fmt}_{in_f}x{out_f}", [x, w], out)
    return y + bias.astype(F32) if bias is not None else y


def route_topk(n_experts: int, k: int):
    """TIR ``route(logits[s, E], experts[s, k], weights[s, k])``: each token's ``k`` largest router logits
    (ties to the lower expert id), then a softmax over them — Mixtral's routing. Written here rather than with
    Relax's ``topk``, whose CPU lowering calls a sort from TVM's compiler library."""
    E, K = n_experts, k

    @T.prim_func(private=True, s_tir=True)
    def route(var_logits: T.handle, var_ids: T.handle, var_w: T.handle):
        T.func_attr({"tir.noalias": True})
        s = T.int64()
        logits = T.match_buffer(var_logits, (s, E), "float32")
        ids = T.match_buffer(var_ids, (s, K), "int32")
        w = T.match_buffer(var_w, (s, K), "float32")
        with T.sblock("root"):
            best = T.alloc_buffer((2,), "float32", scope="global")
            pick = T.alloc_buffer((1,), "int32", scope="global")
            for t in range(s):
                for j in range(K):
                    pick[0] = -1
                    best[0] = T.float32(-3.4e38)
                    for e in range(E):
                        best[1] = T.float32(0)  # 1 when expert e is already taken
                        for q in range(j):
                            if ids[t, q] == e:
                                best[1] = T.float32(1)
                        if best[1] == T.float32(0) and (pick[0] < 0 or logits[t, e] > best[0]):
                            best[0] = logits[t, e]
                            pick[0] = e
                    ids[t, j] = pick[0]
                    w[t, j] = best[0]
                best[0] = w[t, 0]  # the largest
                best[1] = T.float32(0)
                for j in range(K):
                    best[1] = best[1] + T.exp(w[t, j] - best[0])
                for j in range(K):
                    w[t, j] = T.exp(w[t, j] - best[0]) / best[1]

    return route


class OffloadStep(nn.Module):
    """The per-layer decode and prefill steps of a packed model (no parameters: weights are arguments)."""

    def __init__(self, c: ArchConfig, fixed_dtype: str, cluster: int, rank: int, target, layout=None,
                 threads: int = 2, int8: bool = False) -> None:
        self.c, self.fmt, self.cluster, self.rank, self.target = c, fixed_dtype, cluster, rank, target
        self.lanes = simd_lanes(target)
        self.embed_fmt = embed_format(fixed_dtype)
        self.n_clusters = c.intermediate_size // cluster
        self.layout, self.threads = layout, threads  # the flash records' layout: decode_resident's FFN kernel
        self.int8 = int8_dot_isa(target) if int8 else ""  # decode_resident's FFN kernel: int8 dot products

    # --- pieces ----------------------------------------------------------------------------------------
    def _add_parts(self, h: nn.Tensor, ys: nn.Tensor, yw: nn.Tensor) -> nn.Tensor:
        m = ys.shape[0]
        return h + op.sum(ys * op.reshape(yw, (m, 1, 1, 1)), axis=0)

    def _norm(self, h: nn.Tensor, w: nn.Tensor) -> nn.Tensor:
        return op.rms_norm(h, w, axes=-1, epsilon=self.c.rms_norm_eps)

    def _cluster_mask(self, x: nn.Tensor, w1, b1, w2, b2, thr) -> nn.Tensor:
        c, r, C, n = self.c, self.rank, self.cluster, self.n_clusters
        a = op.relu(_linear(op.reshape(x, (1, 1, c.hidden_size)), w1, c.hidden_size, r, "float16") + b1)
        z = _linear(a, w2, r, c.intermediate_size, "float16") + b2

        def mask(z, thr):
            k = te.reduce_axis((0, C), name="k")
            top = te.compute((n,), lambda j: te.max(z[0, 0, j * C + k], axis=k), name="cluster_max")
            return te.compute((n,), lambda j: (top[j] > thr[0]).astype("int32"), name="cluster_mask")

        return op.tensor_expr_op(mask, "cluster_mask", [z, thr])

    def _attend(self, h, kv, layer_id, attn_norm, qkv, qkv_bias, o, ffn_norm):
        c, s = self.c, h.shape[1]
        rows = (c.num_heads + 2 * c.num_kv_heads) * c.head_dim
        q = _linear(self._norm(h, attn_norm), qkv, c.hidden_size, rows, self.fmt, qkv_bias, self.lanes)
        q = op.reshape(q, (1, s, c.num_heads + 2 * c.num_kv_heads, c.head_dim))
        a = kv.attention_with_fused_qkv(layer_id, q, c.num_heads, sm_scale=c.head_dim ** -0.5)
        a = op.reshape(a, (1, s, c.num_heads * c.head_dim))
        h = h + _linear(a, o, c.num_heads * c.head_dim, c.hidden_size, self.fmt, lanes=self.lanes)
        return h, op.reshape(self._norm(h, ffn_norm), (s * c.hidden_size,))

    # --- exported functions ----------------------------------------------------------------------------
    def embed(self, ids: nn.Tensor, table: nn.Tensor) -> nn.Tensor:
        c, s = self.c, ids.shape[1]
        out = nn.Tensor.placeholder([1, s, c.hidden_size], F32)
        if self.embed_fmt == "float16":
            return op.tensor_ir_op(embedding_fp16(c.vocab_size, c.hidden_size), "embedding", [ids, table], out)
        return op.tensor_ir_op(embedding_quant(c.vocab_size, c.hidden_size, self.embed_fmt),
                               f"embedding_{self.embed_fmt}", [ids, table], out)

    def layer(self, h, ys, yw, kv, layer_id, attn_norm, qkv, o, ffn_norm, qkv_bias=None):
        h, x = self._attend(self._add_parts(h, ys, yw), kv, layer_id, attn_norm, qkv, qkv_bias, o, ffn_norm)
        return h, x, kv

    def layer_predict(self, h, ys, yw, kv, layer_id, attn_norm, qkv, o, ffn_norm, w1, b1, w2, b2, thr,
                      qkv_bias=None):
        h, x = self._attend(self._add_parts(h, ys, yw), kv, layer_id, attn_norm, qkv, qkv_bias, o, ffn_norm)
        return h, x, self._cluster_mask(x, w1, b1, w2, b2, thr), kv

    def predict(self, x, w1, b1, w2, b2, thr):
        return self._cluster_mask(x, w1, b1, w2, b2, thr)

    def pre_norm(self, h, ys, yw, ffn_norm):
        return op.reshape(self._norm(self._add_parts(h, ys, yw), ffn_norm), (self.c.hidden_size,))

    def route(self, x, router):
        c = self.c
        s = x.shape[0] // c.hidden_size
        logits = op.matmul(op.reshape(x, (s, c.hidden_size)), op.permute_dims(router))
        k = c.experts_per_token
        return op.tensor_ir_op(route_topk(c.num_experts, k), f"route_top{k}", [logits],
                               [nn.Tensor.placeholder([s, k], "int32"), nn.Tensor.placeholder([s, k], F32)])

    def head(self, h, ys, yw, final_norm, head):
        return self._head(self._add_parts(h, ys, yw), final_norm, head)

    def decode_resident(self, ids, kv, table, final_norm, head, pool, layers):
        d = self.c.hidden_size
        kernel = sparse_ffn_kernel(self.layout, "fused", self.threads, symbolic=True, int8=self.int8)
        h = self.embed(ids, table)
        for i, (attn_norm, qkv, o, ffn_norm, thr, slots, *bias) in enumerate(layers):
            h, x = self._attend(h, kv, i, attn_norm, qkv, bias[0] if bias else None, o, ffn_norm)
            y = op.tensor_ir_op(kernel, "ffn_fused", [x, slots, thr, pool], nn.Tensor.placeholder([d], F32))
            h = h + op.reshape(y, (1, 1, d))
        return self._head(h, final_norm, head), kv

    def _head(self, h, final_norm, head):
        c = self.c
        last = op.tensor_expr_op(
            lambda x: te.compute((1, 1, c.hidden_size), lambda b, t, j: x[b, x.shape[1] - 1, j], name="last"),
            "last_token", [h])
        return _linear(self._norm(last, final_norm), head, c.hidden_size, c.vocab_size, self.embed_fmt,
                       lanes=self.lanes)

    def create_paged_kv_cache(self, max_batch_size: int, max_total_seq_len: int, prefill_chunk_size: int,
                              page_size: int, support_sliding_window: int) -> PagedKVCache:
        return paged_kv_cache(self.c, self.target, max_batch_size, max_total_seq_len, prefill_chunk_size,
                              page_size, support_sliding_window)

    def export_spec(self) -> dict:
        c, fmt, T = self.c, self.fmt, nn.spec.Tensor
        d, q_rows = c.hidden_size, (c.num_heads + 2 * c.num_kv_heads) * c.head_dim
        none = {"param_mode": "none", "effect_mode": "none"}
        kv = nn.spec.Object(object_type=PagedKVCache)
        parts = {"h": T([1, "s", d], F32), "ys": T(["m", 1, "s", d], F32), "yw": T(["m"], F32)}
        attn = {"kv": kv, "layer_id": int, "attn_norm": T([d], F32), "qkv": matrix_spec(q_rows, d, fmt),
                "o": matrix_spec(d, c.num_heads * c.head_dim, fmt), "ffn_norm": T([d], F32)}
        pred = {"w1": matrix_spec(self.rank, d, "float16"), "b1": T([self.rank], F32),
                "w2": matrix_spec(c.intermediate_size, self.rank, "float16"), "b2": T([c.intermediate_size], F32),
                "thr": T([1], F32)}
        bias = {"qkv_bias": T([q_rows], "float16")} if c.qkv_bias else {}
        spec = {
            "embed": {"ids": T([1, "s"], "int32"), "table": matrix_spec(c.vocab_size, d, self.embed_fmt), "$": none},
            "layer": {**parts, **attn, **bias, "$": none},
            "layer_predict": {**parts, **attn, **pred, **bias, "$": none},
            "predict": {"x": T([d], F32), **pred, "$": none},
            "pre_norm": {"h": T([1, 1, d], F32), "ys": T(["m", 1, 1, d], F32), "yw": T(["m"], F32),
                         "ffn_norm": T([d], F32), "$": none},
            "head": {**parts, "final_norm": T([d], F32), "head": matrix_spec(c.vocab_size, d, self.embed_fmt),
                     "$": none},
            "create_paged_kv_cache": {"max_batch_size": int, "max_total_seq_len": int, "prefill_chunk_size": int,
                                      "page_size": int, "support_sliding_window": int, "$": none},
        }
        if c.is_moe:
            spec["route"] = {"x": T(["sd"], F32), "router": T([c.num_experts, d], F32), "$": none}
        elif self.layout is not None:
            one = [attn["attn_norm"], attn["qkv"], attn["o"], attn["ffn_norm"], T([1], F32),
                   T([self.n_clusters], "int32"), *bias.values()]
            spec["decode_resident"] = {
                "ids": T([1, 1], "int32"), "kv": kv, "table": matrix_spec(c.vocab_size, d, self.embed_fmt),
                "final_norm": T([d], F32), "head": matrix_spec(c.vocab_size, d, self.embed_fmt),
                "pool": T(["n", *self.layout.shape()[1:]], self.layout.storage_dtype),
                "layers": [list(one) for _ in range(c.num_layers)], "$": none}
        return spec


def build_decode_module(config: ArchConfig, fixed_dtype: str, cluster: int, rank: int, target, layout=None,
                        threads: int = 2, int8: bool = False):
    """The Relax VM executable of :class:`OffloadStep` for ``target`` (not yet exported)."""
    import tvm

    step = OffloadStep(config, fixed_dtype, cluster, rank, target, layout, threads, int8)
    mod, _ = step.export_tvm(spec=step.export_spec())
    return tvm.compile(ReplaceCPUAttention()(mod), target=target)


def build_ffn_module(layout, threads: int, target, int8: bool = False):
    """The neuron-cluster kernels over a pool of any number of slots, and the records' dequantizer."""
    import tvm

    modes = ["fused", "dense"] + (["gate", "updown"] if layout.gated else [])
    isa = int8_dot_isa(target) if int8 else ""
    funcs = {m: sparse_ffn_kernel(layout, m, threads, symbolic=True, int8=isa).with_attr("global_symbol", m)
             for m in modes}
    funcs["dequant"] = dequantize_kernel(layout, threads, symbolic=True).with_attr("global_symbol", "dequant")
    return tvm.compile(tvm.IRModule(funcs), target=target)


def sparse_dot(layout, target, dot: str = "auto") -> str:
    """The dot products of the neuron-cluster kernels: ``int8`` (activations quantized to int8 blocks, as llama.cpp
    does) where ``dot`` asks for it or, with ``auto``, where the target has the instructions and the records are
    q4_0; else ``float32``."""
    available = layout.dtype == "q4_0" and int8_dot_available(target)
    if dot == "int8" and not available:
        raise XpucError(f"--dot int8 needs q4_0 records and a CPU with int8 dot products (AVX-512 VNNI, arm64 "
                        f"dotprod; records {layout.dtype}, "
                        f"target {target.attrs.get('mcpu', '?')})")
    return "int8" if dot == "int8" or (dot == "auto" and available) else "float32"


def export_offload_modules(config: ArchConfig, layout, fixed_dtype: str, rank: int, threads: int, profile,
                           out: Path, dot: str = "auto") -> dict:
    """Build and link both libraries for ``profile``'s CPU into ``out``; returns their manifest entries."""

    target, toolchain = profile.cpu_target(), profile.toolchain()
    dot = sparse_dot(layout, target, dot)
    if not toolchain.available():
        raise XpucError(f"toolchain '{toolchain.name}' for {toolchain.mtriple} not found ({toolchain.compiler}); "
                        "install it (Debian: apt-get install clang lld gcc-aarch64-linux-gnu)")
    int8 = dot == "int8"
    build_decode_module(config, fixed_dtype, layout.cluster, rank, target, layout, threads, int8).export_library(
        str(out / DECODE_LIB), fcompile=toolchain.fcompile())
    build_ffn_module(layout, threads, target, int8).export_library(str(out / FFN_LIB), fcompile=toolchain.fcompile())
    return {"decode": DECODE_LIB, "ffn": FFN_LIB, "mtriple": profile.mtriple, "target": str(target),
            "toolchain": toolchain.name, "threads": threads, "device": profile.name, "dot": dot}
