"""Decode GEMV over GGML blocks with int8 dot products (x86 with AVX-512 VNNI), llama.cpp's way.

The token's activations are quantized once per call to int8 blocks of 32 (scale ``max|x| / 127``, rounded half
away from zero: :func:`xpuc.runtime.formats.bundle.int8_activations`), then each 32-value unit of a weight row
is one 256-bit ``vpdpbusd`` (unsigned bytes times signed bytes, four products summed per int32 lane):

* q4_0 / q5_0 / q6_k: the unsigned 4- / 5- / 6-bit values times the activations, the accumulator starting at
  ``-8`` / ``-16`` / ``-32`` times each group of four activations' sum (the formats' offset folded in);
* q4_1, q4_k, q5_k: the values times the activations, plus the unit's minimum times the activations' block sum;
* q8_0: the signed weights plus 128 (top bit flipped: unsigned) times the activations, the accumulator
  starting at ``-128`` times each group of four activations' sum.

The int32 lanes are converted and scaled by the unit's scale (the K formats' sub-block scales; q6_k's two
16-value halves per lane group) times the activation block's scale. The weights keep
:mod:`xpuc.schedules.linear_quant`'s storage (blocks of 8 rows interleaved); the 8 rows of a group share every
activation load.
"""

from __future__ import annotations

from tvm.script import tirx as T

from xpuc.schedules.int8_lanes import lane_buffers, lane_parts
from xpuc.schedules.quant_formats import BLOCKS, INT8_FORMATS, QBLOCK
from xpuc.schedules.quant_tir import PREFETCH_GROUPS, _k_scale_min, int8_block, prefetch_block

__all__ = ["INT8_FORMATS", "int8_buffers", "int8_gemv", "int8_parts"]


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


def _bytes32(w, g, sb, r, at):
    return w[g, sb, r, T.Ramp(at, 1, QBLOCK)]


def _field(v, shift, mask: int):
    """``(v >> shift) & mask`` over uint8x32 (``shift`` a constant or a loop variable)."""
    return T.bitwise_and(T.shift_right(v, T.Broadcast(T.Cast("uint8", shift), QBLOCK)),
                         T.Broadcast(T.uint8(mask), QBLOCK))


def unit_parts(fmt: str):
    """``(values, scale, corr)`` of the 32-value unit ``j`` of storage block ``sb`` of row ``r``: its values as
    the unsigned bytes of the dot products (uint8x32, value order), its scale (float32; for q6_k, whose two
    16-value halves differ, float32x8: one per 4 values) and the weight of the activations' block sum (``None``:
    the format's offset is folded into the accumulators instead, :data:`INT8_FORMATS`). Blocks of 32 values have
    one unit (``j`` = 0)."""

    if fmt in ("q4_0", "q4_1", "q5_0", "q8_0"):
        def values(w, g, sb, j, r):
            if fmt == "q8_0":  # the signed bytes plus 128 (top bit flipped) are unsigned
                return T.bitwise_xor(_bytes32(w, g, sb, r, 2), T.Broadcast(T.uint8(128), QBLOCK))
            if fmt == "q5_0":
                return _q5_values(w, g, sb, r)
            return _nibbles32(w, g, sb, r, 4 if fmt == "q4_1" else 2)

        def scale(w, g, sb, j, r):
            return _half(w, g, sb, r, 0)

        def corr(w, g, sb, j, r):
            return _half(w, g, sb, r, 2) if fmt == "q4_1" else None
    elif fmt in ("q4_k", "q5_k"):
        def values(w, g, sb, j, r):
            low = _field(_bytes32(w, g, sb, r, (16 if fmt == "q4_k" else 48) + (j // 2) * QBLOCK), (j % 2) * 4, 15)
            if fmt == "q4_k":
                return low
            return T.bitwise_or(low, T.shift_left(_field(_bytes32(w, g, sb, r, 16), j, 1),
                                                  T.Broadcast(T.uint8(4), QBLOCK)))

        def scale(w, g, sb, j, r):
            return _half(w, g, sb, r, 0) * _k_scale_min(w, g, sb, r, j)[0]

        def corr(w, g, sb, j, r):
            return T.float32(0) - _half(w, g, sb, r, 2) * _k_scale_min(w, g, sb, r, j)[1]
    elif fmt == "q6_k":
        def values(w, g, sb, j, r):
            low = _field(_bytes32(w, g, sb, r, (j // 4) * 64 + (j % 2) * QBLOCK), ((j // 2) % 2) * 4, 15)
            high = _field(_bytes32(w, g, sb, r, 128 + (j // 4) * QBLOCK), (j % 4) * 2, 3)
            return T.bitwise_or(low, T.shift_left(high, T.Broadcast(T.uint8(4), QBLOCK)))

        def scale(w, g, sb, j, r):
            halves = [T.Broadcast(T.Cast("float32", T.reinterpret("int8", w[g, sb, r, 192 + j * 2 + h])), 4)
                      for h in range(2)]
            return T.Shuffle(halves, list(range(8))) * T.Broadcast(_half(w, g, sb, r, 208), 8)

        def corr(w, g, sb, j, r):
            return None
    else:
        raise ValueError(f"no int8 dot products for '{fmt}' (have: {', '.join(INT8_FORMATS)})")
    return values, scale, corr


def int8_parts(wshape: tuple[int, int, int, int], fmt: str):
    """The TIR macros ``(quantize, group_dot8)`` of int8 dot products over weights of storage shape ``wshape``
    (``linear_quant.quantized_shape``) in ``fmt``, one of :data:`INT8_FORMATS`.

    ``quantize(x, xv)`` fills ``xv = (xq (K,) int8, xs (K/32,) f32, xadj (K/4,) i32, xsum (K/32,) f32)`` from
    ``x[0, 0]``; ``group_dot8(xv, acc, w, g, last)`` leaves the dot products of the ``R`` rows of group ``g`` in
    ``acc[r, 0]`` (``acc``: at least (R, 8) float32; group ``g + PREFETCH_GROUPS``, at most ``last``, prefetched).
    """
    if fmt not in INT8_FORMATS:
        raise ValueError(f"no int8 GEMV for '{fmt}' (have: {', '.join(INT8_FORMATS)})")
    _, NS, R, BB = wshape
    SUB = BLOCKS[fmt][0] // QBLOCK
    NB = NS * SUB  # 32-value units
    OFFSET = INT8_FORMATS[fmt]
    values, scale, corr = unit_parts(fmt)

    def vnni(acc, u8, s8):
        return T.call_llvm_pure_intrin("int32x8", "llvm.x86.avx512.vpdpbusd.256", acc, u8, s8)

    def init(xadj, u):
        """The accumulators' initial value for unit ``u``: the folded offset, or zeros."""
        return xadj[T.Ramp(u * 8, 1, 8)] if OFFSET else T.Broadcast(T.int32(0), 8)

    def scale8(w, g, sb, j, r):
        sc = scale(w, g, sb, j, r)
        return sc if str(sc.ty).endswith("x8") else T.Broadcast(sc, 8)

    @T.macro
    def quantize(x, xv):
        xq, xs, xadj, xsum = xv[0], xv[1], xv[2], xv[3]
        for b in range(NB):
            int8_block(x, b, xq, xs)
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
        for sb in range(NS):
            prefetch_block(w, g + PREFETCH_GROUPS, sb, last, R, BB)
            for j in T.unroll(SUB):
                for r in T.unroll(R):
                    acc[r, T.Ramp(0, 1, 8)] = acc[r, T.Ramp(0, 1, 8)] + T.Cast("float32x8", vnni(
                        init(xadj, sb * SUB + j), values(w, g, sb, j, r),
                        xq[T.Ramp((sb * SUB + j) * QBLOCK, 1, QBLOCK)])) * scale8(w, g, sb, j, r) * T.Broadcast(
                        xs[sb * SUB + j], 8)
                    if corr(w, g, sb, j, r) is not None:
                        acc[r, 0] = acc[r, 0] + corr(w, g, sb, j, r) * xsum[sb * SUB + j]
        for r in T.unroll(R):
            acc[r, 0] = ((acc[r, 0] + acc[r, 4]) + (acc[r, 1] + acc[r, 5])) + (
                (acc[r, 2] + acc[r, 6]) + (acc[r, 3] + acc[r, 7]))

    return quantize, group_dot8


def int8_buffers(k: int):
    """Allocate the quantized activations ``xv`` of :func:`int8_parts` for ``k`` inputs (inside a TIR body)."""
    return (T.alloc_buffer((k,), "int8", scope="global"), T.alloc_buffer((k // QBLOCK,), "float32", scope="global"),
            T.alloc_buffer((k // 4,), "int32", scope="global"),
            T.alloc_buffer((k // QBLOCK,), "float32", scope="global"))


def int8_gemv(wshape: tuple[int, int, int, int], fmt: str, lanes: bool = False, isa: str = "avx512vnni"):
    """The TIR macro ``gemv8(x, w, y)`` of the one-token ``y[0, 0] = W @ x[0, 0]`` with int8 dot products (module
    docstring): the activations quantized on the calling thread, then one parallel task per row group. With
    ``lanes``, over the lane layout (:mod:`xpuc.schedules.int8_lanes`; ``w`` its flat view) with ``isa``'s
    instructions; without, x86 only."""
    NR, NS, R, _ = wshape
    if not lanes and isa != "avx512vnni":
        raise ValueError(f"the per-row int8 GEMV is x86 only (isa '{isa}'); the lane layout has {isa}")
    quantize, group_dot8 = lane_parts(wshape, fmt, isa) if lanes else int8_parts(wshape, fmt)
    buffers = lane_buffers if lanes else int8_buffers

    @T.macro
    def gemv8(x, w, y):
        xv = buffers(NS * BLOCKS[fmt][0])
        quantize(x, xv)
        for g in T.parallel(NR):
            acc = T.alloc_buffer((R, 8), "float32", scope="global")
            group_dot8(xv, acc, w, g, NR - 1)
            for r in T.unroll(R):
                y[0, 0, g * R + r] = acc[r, 0]

    return gemv8
