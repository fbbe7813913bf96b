"""Dense kernels over GGML-quantized weight rows (q4_0, q4_1, q8_0), written directly in TIR.

Each row of a weight matrix ``W`` (out, in) is a sequence of GGML blocks of 32 values along the input
dimension, byte-identical to llama.cpp's ``block_q4_0`` (fp16 scale, 16 bytes of nibbles: value
``(q - 8) * s``), ``block_q4_1`` (fp16 scale, fp16 minimum, 16 bytes of nibbles: ``q * s + m``) and
``block_q8_0`` (fp16 scale, 32 int8: ``q * s``); a GGUF model's quantized matrices keep their exact values
(see :func:`quantize_rows`). The kernels take the blocks of ``R`` = 8 consecutive rows interleaved
(:func:`quantize_matrix`): storage ``(out/R, in/32, R, block_bytes)`` uint8, so that a task computing those
``R`` rows reads one sequential stream (measured on the 576x1536 q4_1 GEMV with weights streamed from memory:
6.4 GB/s against 3.9-4.8 GB/s for row-after-row storage).

Kernels (activations fp32, a symbolic number of tokens ``n``):

* :func:`linear_quant` — ``y[0, t, i] = sum_k x[0, t, k] * W[i, k]``. One token (decode): parallel tasks
  over blocks of ``R`` rows whose 16-lane accumulators share every activation load, weights unpacked in
  registers. Several tokens (prefill): each task dequantizes its rows into an fp32 scratch once and reuses
  them for every token.
* :func:`embedding_quant` — gather of token rows, dequantized.
* :func:`gate_up_act_quant` — the decode half of a gated FFN with **thresholded sparsity**: the gate rows'
  dot products of a group of neurons, then, only if one of them fires (``|silu(g)| > thr`` for SwiGLU,
  ``g > 0`` for the ReLU kinds), the group's up rows; the output is the activation ``h`` (zero where a neuron
  did not fire), ready for the down projection.
"""

from __future__ import annotations

from functools import cache

import numpy as np
from tvm import tirx
from tvm.script import tirx as T

from xpuc.runtime.formats.bundle import QBLOCK, dequantize_q4, quantize_q4
from xpuc.schedules.linear import largest_divisor
from xpuc.schedules.sparse_ffn import _activation_exprs

QUANT_FORMATS = {"q4_0": 18, "q4_1": 20, "q8_0": 34}
LANES = 16


def _check(fmt: str, in_features: int) -> int:
    if fmt not in QUANT_FORMATS:
        raise ValueError(f"unknown quantized format '{fmt}' (known: {', '.join(QUANT_FORMATS)})")
    if in_features % QBLOCK:
        raise ValueError(f"{fmt} rows need a multiple of {QBLOCK} values, got {in_features}")
    return QUANT_FORMATS[fmt]


ROW_GROUP = 8
# Software prefetch: while computing block b of row group g, fetch block b of group g + PREFETCH_GROUPS (one
# group = R * in/32 * block bytes ahead, ~3 KiB for SmolLM2). Measured on the 576x1536 q4_1 GEMV with weights
# streamed from memory: 47 us instead of 82 us (11.8 vs 6.6 GB/s) on 2 vCPUs.
PREFETCH_GROUPS = 2


def row_group(out_features: int) -> int:
    """Rows whose blocks are interleaved (``R``): 8, or the largest power of two dividing ``out_features``."""
    return largest_divisor(out_features, ROW_GROUP)


def quantized_shape(in_features: int, out_features: int, fmt: str) -> tuple[int, int, int, int]:
    """Storage shape (uint8) of an (out, in) matrix in ``fmt``: (out/R, in/32, R, block bytes)."""
    bb = _check(fmt, in_features)
    R = row_group(out_features)
    return out_features // R, in_features // QBLOCK, R, bb


def quantize_matrix(w: np.ndarray, fmt: str) -> np.ndarray:
    """(out, in) float matrix -> the kernels' storage (:func:`quantized_shape`): GGML blocks, rows interleaved."""
    n, k = w.shape
    nr, nb, r, bb = quantized_shape(k, n, fmt)
    return np.ascontiguousarray(quantize_rows(w, fmt).reshape(nr, r, nb, bb).transpose(0, 2, 1, 3))


def dequantize_matrix(data: np.ndarray, fmt: str) -> np.ndarray:
    """Inverse of :func:`quantize_matrix` (float32, (out, in))."""
    nr, nb, r, bb = data.shape
    return dequantize_rows(np.ascontiguousarray(data.transpose(0, 2, 1, 3)).reshape(nr * r, nb * bb), fmt)


def quantize_rows(w: np.ndarray, fmt: str) -> np.ndarray:
    """(out, in) float matrix -> (out, in/32 * block_bytes) uint8 GGML blocks.

    The rounding follows llama.cpp's reference quantizers, so a matrix that was dequantized from the same
    format is quantized back to the same values (the block's extreme values fix the scale and minimum).
    """
    _check(fmt, w.shape[-1])
    if fmt in ("q4_0", "q4_1"):
        return quantize_q4(w, with_min=fmt == "q4_1")
    x = w.astype(np.float32).reshape(*w.shape[:-1], -1, QBLOCK)
    amax = np.abs(x).max(-1)
    s = (amax / 127.0).astype(np.float16)
    s32 = s.astype(np.float32)
    inv = np.where(s32 > 0, 1.0 / np.where(s32 > 0, s32, 1), 0.0)
    q = np.clip(np.round(x * inv[..., None]), -127, 127).astype(np.int8)
    blocks = np.concatenate([s.view(np.uint8).reshape(*s.shape, 2), q.view(np.uint8)], axis=-1)
    return np.ascontiguousarray(blocks.reshape(*w.shape[:-1], -1))


def dequantize_rows(data: np.ndarray, fmt: str) -> np.ndarray:
    """Inverse of :func:`quantize_rows` (float32)."""
    if fmt in ("q4_0", "q4_1"):
        return dequantize_q4(data, with_min=fmt == "q4_1")
    b = data.reshape(*data.shape[:-1], -1, QUANT_FORMATS["q8_0"])
    s = np.ascontiguousarray(b[..., 0:2]).view(np.float16)[..., 0].astype(np.float32)[..., None]
    v = np.ascontiguousarray(b[..., 2:]).view(np.int8).astype(np.float32) * s
    return v.reshape(*data.shape[:-1], -1)


def _row_elem(fmt: str):
    """Builder of the fp32 value at row group ``g``, block ``b``, row ``r`` of the group, half ``half`` (0/1),
    lane ``l`` (0..15)."""
    bb = QUANT_FORMATS[fmt]

    def half_float(w, g, b, r, at):
        bits = T.Cast("uint16", w[g, b, r, at]) | T.shift_left(T.Cast("uint16", w[g, b, r, at + 1]), T.uint16(8))
        return T.Cast("float32", T.reinterpret("float16", bits))

    if fmt == "q8_0":

        def elem(w, g, b, r, half, l):
            q = T.Cast("float32", T.reinterpret("int8", w[g, b, r, 2 + half * 16 + l]))
            return q * half_float(w, g, b, r, 0)

        return elem

    def nibble(w, g, b, r, half, l):
        byte = w[g, b, r, (bb - 16) + l]
        return T.Cast("float32", T.shift_right(byte, T.Cast("uint8", half * 4)) & T.uint8(15))

    if fmt == "q4_0":

        def elem(w, g, b, r, half, l):
            return (nibble(w, g, b, r, half, l) - T.float32(8)) * half_float(w, g, b, r, 0)

        return elem

    def elem(w, g, b, r, half, l):
        return nibble(w, g, b, r, half, l) * half_float(w, g, b, r, 0) + half_float(w, g, b, r, 2)

    return elem


def _prefetch_block(w, g, b, last: int, R: int, bb: int) -> None:
    """Emit prefetches of block ``b`` of row group ``min(g, last)`` (its R * bb bytes, one per cache line)."""
    for j in range((R * bb + 63) // 64):
        T.evaluate(T.call_llvm_intrin("void", "llvm.prefetch.p0",
                                      T.address_of(w[T.min(g, last), b, j * 64 // bb, j * 64 % bb]),
                                      T.int32(0), T.int32(3), T.int32(1)))


def _group_dot(elem, NB: int, R: int, bb: int):
    """Macro ``group_dot(x, acc, w, g, last)``: the dot products of x with the ``R`` rows of group ``g``, each
    left in ``acc[r, 0]`` (16-lane accumulators sharing every activation load; group ``g + PREFETCH_GROUPS``,
    at most ``last``, prefetched block by block)."""

    @T.macro
    def group_dot(x, acc, w, g, last):
        for r in T.unroll(R):
            for l in T.vectorized(LANES):
                acc[r, l] = T.float32(0)
        for b in range(NB):
            _prefetch_block(w, g + PREFETCH_GROUPS, b, last, R, bb)
            for half in T.unroll(2):
                for r in T.unroll(R):
                    for l in T.vectorized(LANES):
                        acc[r, l] = acc[r, l] + x[0, 0, b * QBLOCK + half * 16 + l] * elem(w, g, b, r, half, l)
        for r in T.unroll(R):
            for l in T.vectorized(8):
                acc[r, l] = acc[r, l] + acc[r, l + 8]
            for l in T.vectorized(4):
                acc[r, l] = acc[r, l] + acc[r, l + 4]
            for l in T.vectorized(2):
                acc[r, l] = acc[r, l] + acc[r, l + 2]
            acc[r, 0] = acc[r, 0] + acc[r, 1]

    return group_dot


@cache
def linear_quant(in_features: int, out_features: int, fmt: str) -> tirx.PrimFunc:
    """Return the TIR PrimFunc of ``y = x @ W.T`` with ``W`` in GGML format ``fmt``.

    Parameters
    ----------
    in_features, out_features:
        Static matrix shape; ``in_features`` must be a multiple of 32.
    fmt:
        ``q4_0`` | ``q4_1`` | ``q8_0``.

    Returns
    -------
    func : tirx.PrimFunc
        ``(x: (1, n, in) f32, w: quantized_shape(in, out) u8, y: (1, n, out) f32)``; one parallel task per
        group of ``R`` interleaved rows.
    """
    K, N = in_features, out_features
    WSHAPE = quantized_shape(K, N, fmt)
    NR, NB, R, BB = WSHAPE
    elem = _row_elem(fmt)
    group_dot = _group_dot(elem, NB, R, BB)

    @T.prim_func(private=True, s_tir=True)
    def linear(var_x: T.handle, w: T.Buffer(WSHAPE, "uint8"), var_y: T.handle):
        T.func_attr({"tir.noalias": True, "tirx.is_scheduled": True})
        n = T.int64()
        x = T.match_buffer(var_x, (1, n, K), "float32")
        y = T.match_buffer(var_y, (1, n, N), "float32")
        with T.sblock("root"):
            for ib in T.parallel(NR):
                acc = T.alloc_buffer((R, LANES), "float32", scope="global")
                if n == T.int64(1):
                    group_dot(x, acc, w, ib, NR - 1)
                    for r in T.unroll(R):
                        y[0, 0, ib * R + r] = acc[r, 0]
                else:
                    wblk = T.alloc_buffer((R, K), "float32", scope="global")
                    for r in range(R):
                        for b in range(NB):
                            for half in T.unroll(2):
                                for l in T.vectorized(LANES):
                                    wblk[r, b * QBLOCK + half * 16 + l] = elem(w, ib, b, r, half, l)
                    for t in range(n):
                        for r in T.unroll(R):
                            for l in T.vectorized(LANES):
                                acc[r, l] = T.float32(0)
                        for kb in range(K // LANES):
                            for r in T.unroll(R):
                                for l in T.vectorized(LANES):
                                    acc[r, l] = acc[r, l] + x[0, t, kb * LANES + l] * wblk[r, kb * LANES + l]
                        for r in T.unroll(R):
                            y[0, t, ib * R + r] = T.float32(0)
                            for l in range(LANES):
                                y[0, t, ib * R + r] = y[0, t, ib * R + r] + acc[r, l]

    return linear


@cache
def embedding_quant(vocab: int, d: int, fmt: str) -> tirx.PrimFunc:
    """``(ids: (1, n) i32, w: quantized_shape(d, vocab) u8, h: (1, n, d) f32)``: the tokens' rows, dequantized."""
    WSHAPE = quantized_shape(d, vocab, fmt)
    _, NB, R, _ = WSHAPE
    elem = _row_elem(fmt)

    @T.prim_func(private=True, s_tir=True)
    def embedding(var_ids: T.handle, w: T.Buffer(WSHAPE, "uint8"), var_h: T.handle):
        T.func_attr({"tir.noalias": True})
        n = T.int64()
        ids = T.match_buffer(var_ids, (1, n), "int32")
        h = T.match_buffer(var_h, (1, n, d), "float32")
        with T.sblock("root"):
            for t in range(n):
                for b in range(NB):
                    for half in T.unroll(2):
                        for l in T.vectorized(LANES):
                            h[0, t, b * QBLOCK + half * 16 + l] = elem(w, ids[0, t] // R, b, ids[0, t] % R, half,
                                                                       l)

    return embedding


@cache
def gate_up_act_quant(d: int, d_ff: int, fmt: str, kind: str) -> tirx.PrimFunc:
    """The gate/up half of a gated FFN for one token, skipping the up row of neurons that do not fire.

    Parameters
    ----------
    d, d_ff:
        Model width and number of neurons; the weight is the fused ``[gate; up]`` matrix (2 d_ff, d).
    fmt:
        ``q4_0`` | ``q4_1`` | ``q8_0``.
    kind:
        ``swiglu`` (fires when ``|silu(g)| > thr``), ``reglu`` or ``drelu`` (fire when ``g > 0``).

    One parallel task per group of ``R`` neurons (the interleaved row group): their gate rows share every
    activation load; the group's up rows are read only when one of its neurons fires (they are interleaved,
    so reading them is one sequential stream), and a neuron that does not fire outputs 0.

    Returns
    -------
    func : tirx.PrimFunc
        ``(x: (1, 1, d) f32, w: quantized_shape(d, 2 d_ff) u8, thr: (1,) f32, h: (1, 1, d_ff) f32)``.
    """
    if kind not in ("swiglu", "reglu", "drelu"):
        raise ValueError(f"gate_up_act_quant needs a gated FFN kind, got '{kind}'")
    WSHAPE = quantized_shape(d, 2 * d_ff, fmt)
    NR, NB, G, BB = WSHAPE
    if d_ff % G:
        raise ValueError(f"d_ff={d_ff} is not a multiple of the row group {G}")
    UP = d_ff // G  # first row group of the up rows
    group_dot = _group_dot(_row_elem(fmt), NB, G, BB)
    fires, combine = _activation_exprs(kind)

    @T.prim_func(private=True, s_tir=True)
    def gate_up_act(x: T.Buffer((1, 1, d), "float32"), w: T.Buffer(WSHAPE, "uint8"),
                    thr: T.Buffer((1,), "float32"), h: T.Buffer((1, 1, d_ff), "float32")):
        T.func_attr({"tir.noalias": True, "tirx.is_scheduled": True})
        with T.sblock("root"):
            for grp in T.parallel(d_ff // G):
                acc = T.alloc_buffer((G, LANES), "float32", scope="global")
                up = T.alloc_buffer((G, LANES), "float32", scope="global")
                group_dot(x, acc, w, grp, UP - 1)
                fired = T.alloc_buffer((1,), "int32", scope="global")
                fired[0] = 0
                for r in range(G):
                    if fires(acc[r, 0], thr[0]):
                        fired[0] = 1
                if fired[0] == 1:
                    group_dot(x, up, w, UP + grp, NR - 1)
                    for r in range(G):
                        h[0, 0, grp * G + r] = combine(acc[r, 0], up[r, 0], thr[0])
                else:
                    for r in range(G):
                        h[0, 0, grp * G + r] = T.float32(0)

    return gate_up_act
