"""Decode GEMV over GGML blocks with int8 dot products (x86 with AVX-512 VNNI), llama.cpp's way.

The token's activations are quantized once per call to int8 blocks of 32 (scale ``max|x| / 127``, rounded half
away from zero: :func:`xpuc.runtime.formats.bundle.int8_activations`), then every weight block's dot product is
one 256-bit ``vpdpbusd`` (unsigned bytes times signed bytes, four products summed per int32 lane):

* q4_0 / q5_0: the unsigned 4- / 5-bit values times the activations, the accumulator starting at ``-8`` /
  ``-16`` times each group of four activations' sum (the formats' offset folded in);
* q4_1: the nibbles times the activations, plus the block's minimum times the activations' block sum;
* q8_0: the signed weights plus 128 (top bit flipped: unsigned) times the activations, the accumulator
  starting at ``-128`` times each group of four activations' sum.

The int32 lanes are converted and scaled by the weight block's fp16 scale times the activation block's scale.
The weights keep :mod:`xpuc.schedules.linear_quant`'s storage (blocks of 8 rows interleaved); the 8 rows of a
group share every activation load.
"""

from __future__ import annotations

from tvm.script import tirx as T

from xpuc.schedules.quant_formats import QBLOCK
from xpuc.schedules.quant_tir import PREFETCH_GROUPS, prefetch_block

__all__ = ["INT8_FORMATS", "int8_buffers", "int8_gemv", "int8_parts"]

#: formats with an int8 GEMV, and the offset each folds into the accumulators' initial value
INT8_FORMATS = {"q4_0": 8, "q4_1": 0, "q5_0": 16, "q8_0": 128}


def _half(w, g, b, r, at):
    bits = T.Cast("uint16", w[g, b, r, at]) | T.shift_left(T.Cast("uint16", w[g, b, r, at + 1]), T.uint16(8))
    return T.Cast("float32", T.reinterpret("float16", bits))


def _nibbles32(w, g, b, r, at):
    """The 32 4-bit values of a block in value order (16 low nibbles, then 16 high ones), as uint8x32."""
    q = w[g, b, r, T.Ramp(at, 1, 16)]
    return T.Shuffle([T.bitwise_and(q, T.Broadcast(T.uint8(15), 16)), T.shift_right(q, T.Broadcast(T.uint8(4), 16))],
                     list(range(32)))


def _q5_values(w, g, b, r):
    """q5_0's 32 unsigned 5-bit values: the nibbles, bit ``i`` of the 32-bit ``qh`` as bit 4 of value ``i``."""
    qh = T.Shuffle([T.Broadcast(w[g, b, r, 2 + i], 8) for i in range(4)], list(range(32)))  # byte i // 8
    mask = T.shift_left(T.Broadcast(T.uint8(1), 32), T.bitwise_and(T.Ramp(T.uint8(0), T.uint8(1), 32),
                                                                  T.Broadcast(T.uint8(7), 32)))
    high = T.Select(T.bitwise_and(qh, mask) != T.Broadcast(T.uint8(0), 32), T.Broadcast(T.uint8(16), 32),
                    T.Broadcast(T.uint8(0), 32))
    return T.bitwise_or(_nibbles32(w, g, b, r, 6), high)


def _block_dot(fmt: str):
    """``dot(w, g, b, r, xq, xadj) -> int32x8`` of weight block ``b`` of row ``r`` (before scales)."""

    def vnni(acc, u8, s8):
        return T.call_llvm_pure_intrin("int32x8", "llvm.x86.avx512.vpdpbusd.256", acc, u8, s8)

    def dot(w, g, b, r, xq, xadj):
        xv = xq[T.Ramp(b * QBLOCK, 1, QBLOCK)]
        if fmt == "q4_0":
            return vnni(xadj[T.Ramp(b * 8, 1, 8)], _nibbles32(w, g, b, r, 2), xv)
        if fmt == "q5_0":
            return vnni(xadj[T.Ramp(b * 8, 1, 8)], _q5_values(w, g, b, r), xv)
        if fmt == "q4_1":
            return vnni(T.Broadcast(T.int32(0), 8), _nibbles32(w, g, b, r, 4), xv)
        # q8_0: the signed bytes plus 128 (their top bit flipped) are unsigned; 128 x the sums come off via xadj
        q = T.bitwise_xor(w[g, b, r, T.Ramp(2, 1, QBLOCK)], T.Broadcast(T.uint8(128), QBLOCK))
        return vnni(xadj[T.Ramp(b * 8, 1, 8)], q, xv)

    return dot


def int8_parts(wshape: tuple[int, int, int, int], fmt: str):
    """The TIR macros ``(quantize, group_dot8)`` of int8 dot products over weights of storage shape ``wshape``
    (``linear_quant.quantized_shape``) in ``fmt``, one of :data:`INT8_FORMATS`.

    ``quantize(x, xv)`` fills ``xv = (xq (K,) int8, xs (K/32,) f32, xadj (K/4,) i32, xsum (K/32,) f32)`` from
    ``x[0, 0]``; ``group_dot8(xv, acc, w, g, last)`` leaves the dot products of the ``R`` rows of group ``g`` in
    ``acc[r, 0]`` (``acc``: at least (R, 8) float32; group ``g + PREFETCH_GROUPS``, at most ``last``, prefetched).
    """
    if fmt not in INT8_FORMATS:
        raise ValueError(f"no int8 GEMV for '{fmt}' (have: {', '.join(INT8_FORMATS)})")
    _, NB, R, BB = wshape
    OFFSET = INT8_FORMATS[fmt]
    dot = _block_dot(fmt)

    @T.macro
    def quantize(x, xv):
        xq, xs, xadj, xsum = xv[0], xv[1], xv[2], xv[3]
        for b in range(NB):
            xs[b] = T.float32(0)
            for l in range(QBLOCK):
                xs[b] = T.max(xs[b], T.fabs(x[0, 0, b * QBLOCK + l]))
            xs[b] = xs[b] / T.float32(127)
            for l in T.vectorized(QBLOCK):
                xq[b * QBLOCK + l] = T.Cast("int8", T.round(x[0, 0, b * QBLOCK + l] / T.Select(
                    xs[b] > T.float32(0), xs[b], T.float32(1))))
            xsum[b] = T.float32(0)
            for k in range(8):
                xadj[b * 8 + k] = T.int32(-OFFSET) * (
                    T.Cast("int32", xq[b * QBLOCK + k * 4]) + T.Cast("int32", xq[b * QBLOCK + k * 4 + 1])
                    + T.Cast("int32", xq[b * QBLOCK + k * 4 + 2]) + T.Cast("int32", xq[b * QBLOCK + k * 4 + 3]))
                for u in range(4):
                    xsum[b] = xsum[b] + T.Cast("float32", xq[b * QBLOCK + k * 4 + u])
            xsum[b] = xsum[b] * xs[b]

    @T.macro
    def group_dot8(xv, acc, w, g, last):
        xq, xs, xadj, xsum = xv[0], xv[1], xv[2], xv[3]
        for r in T.unroll(R):
            acc[r, T.Ramp(0, 1, 8)] = T.Broadcast(T.float32(0), 8)
        for b in range(NB):
            prefetch_block(w, g + PREFETCH_GROUPS, b, last, R, BB)
            for r in T.unroll(R):
                acc[r, T.Ramp(0, 1, 8)] = acc[r, T.Ramp(0, 1, 8)] + T.Cast(
                    "float32x8", dot(w, g, b, r, xq, xadj)) * T.Broadcast(_half(w, g, b, r, 0) * xs[b], 8)
                if fmt == "q4_1":
                    acc[r, 0] = acc[r, 0] + _half(w, g, b, r, 2) * xsum[b]
        for r in T.unroll(R):
            acc[r, 0] = ((acc[r, 0] + acc[r, 4]) + (acc[r, 1] + acc[r, 5])) + (
                (acc[r, 2] + acc[r, 6]) + (acc[r, 3] + acc[r, 7]))

    return quantize, group_dot8


def int8_buffers(k: int):
    """Allocate the quantized activations ``xv`` of :func:`int8_parts` for ``k`` inputs (inside a TIR body)."""
    return (T.alloc_buffer((k,), "int8", scope="global"), T.alloc_buffer((k // QBLOCK,), "float32", scope="global"),
            T.alloc_buffer((k // 4,), "int32", scope="global"),
            T.alloc_buffer((k // QBLOCK,), "float32", scope="global"))


def int8_gemv(wshape: tuple[int, int, int, int], fmt: str):
    """The TIR macro ``gemv8(x, w, y)`` of the one-token ``y[0, 0] = W @ x[0, 0]`` with int8 dot products (module
    docstring): the activations quantized on the calling thread, then one parallel task per row group."""
    NR, NB, R, _ = wshape
    quantize, group_dot8 = int8_parts(wshape, fmt)

    @T.macro
    def gemv8(x, w, y):
        xv = int8_buffers(NB * QBLOCK)
        quantize(x, xv)
        for g in T.parallel(NR):
            acc = T.alloc_buffer((R, 8), "float32", scope="global")
            group_dot8(xv, acc, w, g, NR - 1)
            for r in T.unroll(R):
                y[0, 0, g * R + r] = acc[r, 0]

    return gemv8
