"""The Relax model built with ``tvm.relax.frontend.nn`` from an ArchConfig.

Functions exported:

* ``prefill(input_ids[1, seq_len], kv_cache, params) -> (logits[1, 1, vocab], kv_cache)``
* ``decode(input_ids[1, 1], kv_cache, params) -> (logits[1, 1, vocab], kv_cache)``
* ``create_paged_kv_cache(max_batch, max_total_seq_len, prefill_chunk, page_size, sliding_window)``

Weights are fp16 parameters (matrices row-block packed, see :func:`xpuc.schedules.linear.pack_rows`);
activations are fp32. Every projection is a call to the scheduled TIR kernel of
:mod:`xpuc.schedules.linear`, the embedding a gather from the same packed table; Q/K/V and
gate/up are fused into one matrix each so that a layer makes four weight passes. Attention and
RoPE run in TVM's paged KV cache.
"""

from __future__ import annotations

import numpy as np
from tvm import relax, te
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import op
from tvm.relax.frontend.nn.llm.kv_cache import PagedKVCache, RopeMode, TIRPagedKVCache

from xpuc.compiler.pipeline import simd_lanes
from xpuc.compiler.spec import ModelSpec
from xpuc.runtime.formats.arch import ArchConfig
from xpuc.schedules.int8_dot import int8_dot_isa
from xpuc.schedules.linear import embedding_fp16, linear_fp16, pack_rows, packed_shape
from xpuc.schedules.linear_quant import (
    embedding_quant,
    gate_up_act_quant,
    interleave_rows,
    linear_quant,
    quantize_matrix,
    quantized_shape,
)

WEIGHT_DTYPE = "float16"
ACT_DTYPE = "float32"


# Kernel flavours: "cpu" = the hand-scheduled TIR kernels over row-block packed weights (decode on
# CPUs); "generic" = standard Relax operators over plain (out, in) weights, scheduled per target by
# dlight (GPU prefill) or left to the default pipeline.
KERNELS = ("cpu", "generic")
_FLAVOUR = {"value": "cpu"}
# Quantized weights (cpu kernels only): GGML format of the projections, and of the embedding / LM head.
QUANTIZATIONS = ("q4_0", "q4_1", "q8_0", "keep")  # keep: each matrix as the GGUF file stores it (weight_formats)
EMBED_QUANT = "q8_0"
_QUANT: dict[str, str | None] = {"linear": None, "embed": None}
_FORMATS: dict[str, str | None] = {}  # ModelSpec matrix name -> format (None: fp16), with quant="keep"
# the target's fp32 SIMD lanes (GEMM tile); int8 dot products, and their instructions (int8_dot_isa)
_KERNEL_CHOICE: dict = {"lanes": 16, "int8": False, "isa": ""}


def _fmt(name: str, default: str | None) -> str | None:
    return _FORMATS[name] if name in _FORMATS else default


def _packed_param(out_f: int, in_f: int, fmt: str | None = None) -> nn.Parameter:
    """An (out, in) matrix: fp16 row-block packed for :func:`linear_fp16` (cpu), plain fp16 (generic), or
    rows of GGML blocks for :func:`linear_quant` when ``fmt`` is given."""
    if fmt is not None:
        p = nn.Parameter(quantized_shape(in_f, out_f, fmt), "uint8")
        p.qfmt = fmt
    else:
        shape = packed_shape(in_f, out_f) if _FLAVOUR["value"] == "cpu" else (out_f, in_f)
        p = nn.Parameter(shape, WEIGHT_DTYPE)
    p.logical_shape = (out_f, in_f)
    return p


def _linear(x: nn.Tensor, weight: nn.Parameter, bias: nn.Tensor | None = None) -> nn.Tensor:
    out_f, in_f = weight.logical_shape
    fmt = getattr(weight, "qfmt", None)
    if fmt is not None:
        func = linear_quant(in_f, out_f, fmt, _KERNEL_CHOICE["lanes"], _KERNEL_CHOICE["int8"], _KERNEL_CHOICE["isa"])
        y = op.tensor_ir_op(func, f"linear_{fmt}_{in_f}x{out_f}", args=[x, weight],
                            out=nn.Tensor.placeholder([1, x.shape[1], out_f], ACT_DTYPE))
        return y + bias.astype(ACT_DTYPE) if bias is not None else y
    if len(weight.shape) == 2:  # generic flavour
        y = op.matmul(x, op.permute_dims(weight.astype(ACT_DTYPE)))
        return y + bias.astype(ACT_DTYPE) if bias is not None else y
    func = linear_fp16(in_f, out_f, bias is not None)
    args = [x, weight] + ([bias] if bias is not None else [])
    return op.tensor_ir_op(func, f"linear_{in_f}x{out_f}" + ("_bias" if bias is not None else ""),
                           args=args, out=nn.Tensor.placeholder([1, x.shape[1], out_f], ACT_DTYPE))


class RMSNorm(nn.Module):
    """RMS norm; its weight is stored in float32 (values rounded through fp16 like every weight), so that a
    decode step runs no cast kernel per norm."""

    def __init__(self, d: int, eps: float) -> None:
        self.weight = nn.Parameter((d,), ACT_DTYPE)
        self.eps = eps

    def forward(self, x: nn.Tensor) -> nn.Tensor:
        return op.rms_norm(x, self.weight, axes=-1, epsilon=self.eps)


class Attention(nn.Module):
    """Q, K and V as one fused matrix, or as three when their formats differ (a GGUF's kept formats)."""

    def __init__(self, c: ArchConfig, i: int) -> None:
        self.c = c
        d, lin = c.hidden_size, _QUANT["linear"]
        fq, fk, fv = (_fmt(f"layers.{i}.{n}_proj", lin) for n in "qkv")
        rows = (c.num_heads + 2 * c.num_kv_heads) * c.head_dim
        if fq == fk == fv:
            self.qkv_weight = _packed_param(rows, d, fq)
        else:
            self.q_weight = _packed_param(c.num_heads * c.head_dim, d, fq)
            self.k_weight = _packed_param(c.num_kv_heads * c.head_dim, d, fk)
            self.v_weight = _packed_param(c.num_kv_heads * c.head_dim, d, fv)
        self.qkv_bias = nn.Parameter((rows,), WEIGHT_DTYPE) if c.qkv_bias else None
        self.o_weight = _packed_param(d, c.num_heads * c.head_dim, _fmt(f"layers.{i}.o_proj", lin))

    def forward(self, x: nn.Tensor, kv: PagedKVCache, layer_id: int) -> nn.Tensor:
        c = self.c
        s = x.shape[1]
        if hasattr(self, "qkv_weight"):
            qkv = _linear(x, self.qkv_weight, self.qkv_bias)
        else:
            qkv = op.concat([_linear(x, self.q_weight), _linear(x, self.k_weight), _linear(x, self.v_weight)],
                            dim=-1)
            qkv = qkv + self.qkv_bias.astype(ACT_DTYPE) if self.qkv_bias is not None else qkv
        qkv = op.reshape(qkv, (1, s, c.num_heads + 2 * c.num_kv_heads, c.head_dim))
        o = kv.attention_with_fused_qkv(layer_id, qkv, c.num_heads, sm_scale=c.head_dim ** -0.5)
        return _linear(op.reshape(o, (1, s, c.num_heads * c.head_dim)), self.o_weight)


class FFN(nn.Module):
    """Gated FFN. With quantized weights, decoding (one token) skips the up row of every neuron that does
    not fire (``|silu(g)| <= threshold``, a per-layer parameter; 0 = exact) in one fused kernel; prefill is
    always dense and exact."""

    def __init__(self, c: ArchConfig, i: int) -> None:
        self.kind = c.ffn_kind
        self.d, self.d_ff = c.hidden_size, c.intermediate_size
        lin = _QUANT["linear"]
        fg, fu = _fmt(f"layers.{i}.gate_proj", lin), _fmt(f"layers.{i}.up_proj", lin)
        if fg == fu:
            self.gate_up_weight = _packed_param(2 * c.intermediate_size, c.hidden_size, fg)
        else:  # formats differ: two matrices, dense decode
            self.gate_weight = _packed_param(c.intermediate_size, c.hidden_size, fg)
            self.up_weight = _packed_param(c.intermediate_size, c.hidden_size, fu)
        self.down_weight = _packed_param(c.hidden_size, c.intermediate_size, _fmt(f"layers.{i}.down_proj", lin))
        self.threshold = nn.Parameter((1,), ACT_DTYPE) if has_threshold(fg, fu) else None

    def forward(self, x: nn.Tensor) -> nn.Tensor:
        if not hasattr(self, "gate_up_weight"):
            return _linear(self._act(_linear(x, self.gate_weight), _linear(x, self.up_weight)), self.down_weight)
        fmt = getattr(self.gate_up_weight, "qfmt", None)
        if fmt is not None and isinstance(x.shape[1], int) and x.shape[1] == 1:
            h = op.tensor_ir_op(gate_up_act_quant(self.d, self.d_ff, fmt, self.kind, _KERNEL_CHOICE["int8"],
                                                  _KERNEL_CHOICE["isa"]),
                                f"gate_up_act_{fmt}_{self.d}x{self.d_ff}_{self.kind}",
                                args=[x, self.gate_up_weight, self.threshold],
                                out=nn.Tensor.placeholder([1, 1, self.d_ff], ACT_DTYPE))
            return _linear(h, self.down_weight)
        g, u = op.split(_linear(x, self.gate_up_weight), 2, axis=-1)
        return _linear(self._act(g, u), self.down_weight)

    def _act(self, g: nn.Tensor, u: nn.Tensor) -> nn.Tensor:
        if self.kind == "swiglu":
            return op.silu(g) * u
        if self.kind == "reglu":
            return op.relu(g) * u
        return op.relu(g) * op.relu(u)  # drelu


def has_threshold(gate_fmt: str | None, up_fmt: str | None) -> bool:
    """Whether a layer's FFN has the thresholded sparse decode kernel (fused quantized gate/up)."""
    return gate_fmt is not None and gate_fmt == up_fmt


class DecoderLayer(nn.Module):
    def __init__(self, c: ArchConfig, i: int) -> None:
        self.attn_norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.attn = Attention(c, i)
        self.ffn_norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.ffn = FFN(c, i)

    def forward(self, h: nn.Tensor, kv: PagedKVCache, layer_id: int) -> nn.Tensor:
        h = h + self.attn(self.attn_norm(h), kv, layer_id)
        return h + self.ffn(self.ffn_norm(h))


def paged_kv_cache(c: ArchConfig, target, max_batch_size, max_total_seq_len, prefill_chunk_size, page_size,
                   support_sliding_window) -> PagedKVCache:
    """TVM's paged KV cache for ``c`` (fp32, rotate-half RoPE applied in the cache): the compiled decoder's and the
    offloading engine's."""
    return TIRPagedKVCache(
        attn_kind="mha", max_batch_size=max_batch_size, max_total_seq_len=max_total_seq_len,
        prefill_chunk_size=prefill_chunk_size, page_size=page_size,
        support_sliding_window=support_sliding_window,
        layer_partition=relax.ShapeExpr([0, c.num_layers]), num_hidden_layers=c.num_layers,
        num_attention_heads=c.num_heads, num_key_value_heads=c.num_kv_heads,
        qk_head_dim=c.head_dim, v_head_dim=c.head_dim, mla_original_qk_head_dim=0,
        mla_original_v_head_dim=0, rope_mode=RopeMode.NORMAL, rope_scale=1, rope_theta=c.rope_theta,
        rope_scaling={}, rope_ext_factors=relax.prim_value(0), rotary_dim=c.head_dim,
        enable_disaggregation=False, dtype=ACT_DTYPE, target=target)


class DecoderModel(nn.Module):
    """A llama/mistral/qwen2 decoder with fp16 weights and a paged KV cache."""

    def __init__(self, c: ArchConfig, target) -> None:
        self.c = c
        self.target = target
        self.embed = _packed_param(c.vocab_size, c.hidden_size, _fmt("embed_tokens", _QUANT["embed"]))
        self.layers = nn.ModuleList([DecoderLayer(c, i) for i in range(c.num_layers)])
        self.final_norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.lm_head = None if c.tie_embeddings else _packed_param(c.vocab_size, c.hidden_size,
                                                                   _fmt("lm_head", _QUANT["embed"]))

    def _body(self, input_ids: nn.Tensor, kv: PagedKVCache) -> nn.Tensor:
        s = input_ids.shape[1]
        fmt = getattr(self.embed, "qfmt", None)
        if fmt is not None:
            h = op.tensor_ir_op(embedding_quant(self.c.vocab_size, self.c.hidden_size, fmt, _KERNEL_CHOICE["int8"]),
                                f"embedding_{fmt}",
                                args=[input_ids, self.embed],
                                out=nn.Tensor.placeholder([1, s, self.c.hidden_size], ACT_DTYPE))
        elif len(self.embed.shape) == 2:  # generic flavour
            h = op.take(self.embed, op.reshape(input_ids, (s,)), axis=0).astype(ACT_DTYPE)
            h = op.reshape(h, (1, s, self.c.hidden_size))
        else:
            h = op.tensor_ir_op(embedding_fp16(self.c.vocab_size, self.c.hidden_size), "embedding",
                                args=[input_ids, self.embed],
                                out=nn.Tensor.placeholder([1, s, self.c.hidden_size], ACT_DTYPE))
        for i, layer in enumerate(self.layers):
            h = layer(h, kv, i)
        return h

    def _logits(self, h: nn.Tensor) -> nn.Tensor:
        h = self.final_norm(h)
        return _linear(h, self.embed if self.lm_head is None else self.lm_head)

    def prefill(self, input_ids: nn.Tensor, paged_kv_cache: PagedKVCache):
        h = self._body(input_ids, paged_kv_cache)
        last = op.tensor_expr_op(
            lambda x: te.compute((1, 1, self.c.hidden_size), lambda b, t, j: x[b, x.shape[1] - 1, j],
                                 name="last_token"), "last_token", [h])
        return self._logits(last), paged_kv_cache

    def decode(self, input_ids: nn.Tensor, paged_kv_cache: PagedKVCache):
        return self._logits(self._body(input_ids, paged_kv_cache)), paged_kv_cache

    def create_paged_kv_cache(self, max_batch_size: int, max_total_seq_len: int,
                              prefill_chunk_size: int, page_size: int,
                              support_sliding_window: int) -> PagedKVCache:
        return paged_kv_cache(self.c, self.target, max_batch_size, max_total_seq_len, prefill_chunk_size,
                              page_size, support_sliding_window)

    def export_spec(self) -> dict:
        kv = nn.spec.Object(object_type=PagedKVCache)
        packed = {"param_mode": "packed", "effect_mode": "none"}
        return {
            "prefill": {"input_ids": nn.spec.Tensor([1, "seq_len"], "int32"), "paged_kv_cache": kv,
                        "$": packed},
            "decode": {"input_ids": nn.spec.Tensor([1, 1], "int32"), "paged_kv_cache": kv, "$": packed},
            "create_paged_kv_cache": {
                "max_batch_size": int, "max_total_seq_len": int, "prefill_chunk_size": int,
                "page_size": int, "support_sliding_window": int,
                "$": {"param_mode": "none", "effect_mode": "none"}},
        }


def export_model(config: ArchConfig, target, kernels: str = "cpu",
                 functions: tuple[str, ...] = ("prefill", "decode", "create_paged_kv_cache"),
                 quant: str | None = None,
                 formats: dict[str, str | None] | None = None,
                 int8: bool = False) -> tuple[object, list[tuple[str, tuple, str]]]:
    """Build the Relax IRModule; returns (module, [(param name, shape, dtype)] in packing order).

    ``kernels`` picks the flavour (see ``KERNELS``); ``functions`` the exported functions; ``quant`` (cpu
    kernels only) stores the projections in that GGML format and the embedding / LM head in ``q8_0``, and
    adds a per-layer FFN activation threshold parameter (``layers.i.ffn.threshold``) where gate and up share a
    quantized format. ``quant="keep"`` takes each matrix's format from ``formats`` (ModelSpec names, see
    :func:`xpuc.compiler.weight_formats.weight_formats`); Q/K/V, and gate/up, are fused where they agree.
    ``int8`` gives the quantized matrices int8 dot products (x86 AVX-512 VNNI, aarch64 ``sdot``: decode GEMVs
    and prefill GEMMs), over the lane layout where :func:`~xpuc.schedules.lane_layout.uses_lanes`
    says so (``param_arrays(..., int8=True)`` stores the weights for it).
    """
    if kernels not in KERNELS:
        raise ValueError(f"kernels must be one of {KERNELS}")
    if quant is not None and (quant not in QUANTIZATIONS or kernels != "cpu"):
        raise ValueError(f"quant must be one of {QUANTIZATIONS} (cpu kernels only)")
    if (quant == "keep") != (formats is not None):
        raise ValueError("formats go with quant='keep', and only with it")
    _FLAVOUR["value"] = kernels
    _QUANT.update(linear=None if quant == "keep" else quant, embed=EMBED_QUANT if quant else None)
    _FORMATS.update(formats or {})
    isa = int8_dot_isa(target) if int8 else ""
    if int8 and not isa:
        raise ValueError(f"int8 dot products: target {target} has neither AVX-512 VNNI nor the dot-product extension")
    _KERNEL_CHOICE.update(lanes=simd_lanes(target), int8=int8, isa=isa)
    try:  # the kernels are chosen while the forward functions are traced, inside export_tvm
        model = DecoderModel(config, target)
        spec = {k: v for k, v in model.export_spec().items() if k in functions}
        mod, named_params = model.export_tvm(spec=spec)
    finally:
        _FLAVOUR["value"] = "cpu"
        _QUANT.update(linear=None, embed=None)
        _FORMATS.clear()
        _KERNEL_CHOICE.update(lanes=16, int8=False, isa="")
    params = [(name, tuple(int(d) for d in p.shape), p.dtype) for name, p in named_params]
    return mod, params


def _norm(weight: np.ndarray) -> np.ndarray:
    """A norm's weight as :class:`RMSNorm` stores it: float32 values rounded through fp16."""
    return weight.astype(WEIGHT_DTYPE).astype(ACT_DTYPE)


def param_arrays(spec: ModelSpec, kernels: str = "cpu", quant: str | None = None,
                 thresholds: list[float] | None = None,
                 formats: dict[str, str | None] | None = None, int8: bool = False) -> dict[str, np.ndarray]:
    """Relax parameter name -> array, from the ModelSpec: fp16 (matrices row-block packed for ``cpu``), or
    with ``quant`` the matrices as GGML blocks (embedding / LM head ``q8_0``) and the FFN thresholds; with
    ``quant="keep"`` each matrix in its format of ``formats``, a GGUF tensor's blocks copied as they are. ``int8``
    (a module exported with it) stores the blocks of the int8 kernels' formats lane by lane
    (:mod:`xpuc.schedules.int8_lanes`: the same bytes, rearranged)."""
    c, w = spec.config, spec.weights
    lin = None if quant == "keep" else quant
    fmts = formats or {}

    def fmt_of(name: str, default: str | None) -> str | None:
        return fmts.get(name, default)

    def _packed(names: list[str], fmt: str | None) -> np.ndarray:
        if fmt is not None:
            stored = [w.blocks(n) for n in names] if quant == "keep" else []
            if stored and all(b is not None and b[1] == fmt for b in stored):  # the file's blocks, as they are
                in_f = w.meta[names[0]][0][1]
                return interleave_rows(np.concatenate([b[0] for b in stored]), fmt, in_f, int8)
            return quantize_matrix(np.concatenate([w[n] for n in names]), fmt, int8)
        m = np.concatenate([w[n] for n in names]).astype(WEIGHT_DTYPE)
        return pack_rows(m) if kernels == "cpu" else np.ascontiguousarray(m)

    embed_fmt = EMBED_QUANT if quant else None
    out: dict[str, np.ndarray] = {"embed": _packed(["embed_tokens"], fmt_of("embed_tokens", embed_fmt)),
                                  "final_norm.weight": _norm(w["final_norm"])}
    if not c.tie_embeddings:
        out["lm_head"] = _packed(["lm_head"], fmt_of("lm_head", embed_fmt))
    t = list(thresholds) if thresholds is not None else [0.0] * c.num_layers
    if quant and len(t) != c.num_layers:
        raise ValueError(f"{len(t)} FFN thresholds for {c.num_layers} layers")
    for i in range(c.num_layers):
        p, q = f"layers.{i}.", f"layers.{i}."
        out[q + "attn_norm.weight"] = _norm(w[p + "attn_norm"])
        out[q + "ffn_norm.weight"] = _norm(w[p + "ffn_norm"])
        fq, fk, fv = (fmt_of(p + n + "_proj", lin) for n in "qkv")
        if fq == fk == fv:
            out[q + "attn.qkv_weight"] = _packed([p + "q_proj", p + "k_proj", p + "v_proj"], fq)
        else:
            for n, f in zip("qkv", (fq, fk, fv), strict=True):
                out[q + f"attn.{n}_weight"] = _packed([p + n + "_proj"], f)
        if c.qkv_bias:
            out[q + "attn.qkv_bias"] = np.concatenate(
                [w[p + "q_bias"], w[p + "k_bias"], w[p + "v_bias"]]).astype(WEIGHT_DTYPE)
        out[q + "attn.o_weight"] = _packed([p + "o_proj"], fmt_of(p + "o_proj", lin))
        fg, fu = fmt_of(p + "gate_proj", lin), fmt_of(p + "up_proj", lin)
        if fg == fu:
            out[q + "ffn.gate_up_weight"] = _packed([p + "gate_proj", p + "up_proj"], fg)
        else:
            out[q + "ffn.gate_weight"] = _packed([p + "gate_proj"], fg)
            out[q + "ffn.up_weight"] = _packed([p + "up_proj"], fu)
        if has_threshold(fg, fu):
            out[q + "ffn.threshold"] = np.array([t[i]], np.float32)
        out[q + "ffn.down_weight"] = _packed([p + "down_proj"], fmt_of(p + "down_proj", lin))
    return out
