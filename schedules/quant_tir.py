"""TIR access to one value of a GGML block (formats in :mod:`xpuc.schedules.quant_formats`).

The kernels walk a row in units of 32 values (``half`` 0/1 x 16 lanes); a 256-value block is 8 such units
(``SUB``). :func:`element` returns the TIR expression of one value at (row group ``g``, block ``sb``, unit
``j`` of the block, row ``r`` of the group, ``half``, lane ``l``); everything but the lane is a constant or
a scalar, so the lanes vectorize.
"""

from __future__ import annotations

from tvm.script import tirx as T

from xpuc.schedules.quant_formats import BLOCKS, QBLOCK


def _half_float(w, g, sb, r, at):
    bits = T.Cast("uint16", w[g, sb, r, at]) | T.shift_left(T.Cast("uint16", w[g, sb, r, at + 1]), T.uint16(8))
    return T.Cast("float32", T.reinterpret("float16", bits))


def _bits(w, g, sb, r, at, shift, mask: int):
    return T.shift_right(w[g, sb, r, at], T.Cast("uint8", shift)) & T.uint8(mask)


def k_scale_min(byte, j):
    """q4_k / q5_k: the 6-bit scale and minimum of unit ``j`` (a constant or a loop variable) from the 12 scale
    bytes, ``byte(b)`` being byte ``b`` (uint8), as float32."""

    def bits(b, shift, mask: int):
        return T.shift_right(byte(b), T.Cast("uint8", shift)) & T.uint8(mask)

    sc = T.if_then_else(j < 4, bits(j, 0, 63), bits(j + 4, 0, 15) | T.shift_left(bits(j - 4, 6, 3), T.uint8(4)))
    m = T.if_then_else(j < 4, bits(j + 4, 0, 63), bits(j + 4, 4, 15) | T.shift_left(bits(j, 6, 3), T.uint8(4)))
    return T.Cast("float32", sc), T.Cast("float32", m)


def _k_scale_min(w, g, sb, r, j):
    """:func:`k_scale_min` of a block in the row-interleaved storage (the scales at bytes 4..15)."""
    return k_scale_min(lambda b: w[g, sb, r, 4 + b], j)


def q5_value(w, g, sb, r, half, l):
    """q5_0's unsigned 5-bit value (0..31) of element ``half * 16 + l``, as float32."""
    low = T.Cast("int32", _bits(w, g, sb, r, 6 + l, half * 4, 15))
    qh = (T.Cast("int32", w[g, sb, r, 2]) | T.shift_left(T.Cast("int32", w[g, sb, r, 3]), 8)
          | T.shift_left(T.Cast("int32", w[g, sb, r, 4]), 16)
          | T.shift_left(T.Cast("int32", w[g, sb, r, 5]), 24))  # lane-invariant word, 32-bit lanes
    high = T.shift_left(T.shift_right(qh, half * 16 + l) & 1, 4)
    return T.Cast("float32", low | high)


def element(fmt: str):
    """``elem(w, g, sb, j, r, half, l)`` -> float32 value for weights stored as ``(groups, blocks, R, bytes)``."""
    if fmt not in BLOCKS:
        raise ValueError(f"unknown quantized format '{fmt}' (known: {', '.join(BLOCKS)})")
    bb = BLOCKS[fmt][1]

    def nibble(w, g, sb, r, at, shift):
        return T.Cast("float32", _bits(w, g, sb, r, at, shift, 15))

    if fmt == "q8_0":
        def elem(w, g, sb, j, r, half, l):
            q = T.Cast("float32", T.reinterpret("int8", w[g, sb, r, 2 + half * 16 + l]))
            return q * _half_float(w, g, sb, r, 0)
    elif fmt == "q4_0":
        def elem(w, g, sb, j, r, half, l):
            return (nibble(w, g, sb, r, (bb - 16) + l, half * 4) - T.float32(8)) * _half_float(w, g, sb, r, 0)
    elif fmt == "q4_1":
        def elem(w, g, sb, j, r, half, l):
            return (nibble(w, g, sb, r, (bb - 16) + l, half * 4) * _half_float(w, g, sb, r, 0)
                    + _half_float(w, g, sb, r, 2))
    elif fmt == "q5_0":
        def elem(w, g, sb, j, r, half, l):
            return (q5_value(w, g, sb, r, half, l) - T.float32(16)) * _half_float(w, g, sb, r, 0)
    elif fmt in ("q4_k", "q5_k"):
        ql_at = 16 if fmt == "q4_k" else 48

        def elem(w, g, sb, j, r, half, l):
            sc, m = _k_scale_min(w, g, sb, r, j)
            q = _bits(w, g, sb, r, ql_at + (j // 2) * 32 + half * 16 + l, 4 * (j % 2), 15)
            if fmt == "q5_k":
                high = _bits(w, g, sb, r, 16 + half * 16 + l, j, 1)
                q = q | T.shift_left(high, T.uint8(4))
            return (_half_float(w, g, sb, r, 0) * sc * T.Cast("float32", q)
                    - _half_float(w, g, sb, r, 2) * m)
    else:  # q6_k
        def elem(w, g, sb, j, r, half, l):
            a, s, t = j // 4, (j // 2) % 2, j % 4
            low = _bits(w, g, sb, r, a * 64 + (j % 2) * 32 + half * 16 + l, 4 * s, 15)
            high = _bits(w, g, sb, r, 128 + a * 32 + half * 16 + l, 2 * t, 3)
            q = T.Cast("float32", low | T.shift_left(high, T.uint8(4))) - T.float32(32)
            sc = T.Cast("float32", T.reinterpret("int8", w[g, sb, r, 192 + j * 2 + half]))
            return _half_float(w, g, sb, r, 208) * sc * q

    return elem


# Software prefetch: while computing block b of row group g, fetch block b of group g + PREFETCH_GROUPS (one
# group = R * in/32 * block bytes ahead, ~3 KiB for SmolLM2). Measured on the 576x1536 q4_1 GEMV with weights
# streamed from memory: 47 us instead of 82 us (11.8 vs 6.6 GB/s) on 2 vCPUs.
PREFETCH_GROUPS = 2


def prefetch_block(w, g, b, last: int, R: int, bb: int) -> None:
    """Emit prefetches of block ``b`` of row group ``min(g, last)`` (its R * bb bytes, one per cache line)."""
    for j in range((R * bb + 63) // 64):
        T.evaluate(T.call_llvm_intrin("void", "llvm.prefetch.p0",
                                      T.address_of(w[T.min(g, last), b, j * 64 // bb, j * 64 % bb]),
                                      T.int32(0), T.int32(3), T.int32(1)))


@T.macro
def int8_block(x, b, xq, xs):
    """Block ``b`` of ``x[0, 0]`` (32 values) as the int8 dot products take it, llama.cpp's way: the scale
    ``max|x| / 127`` in ``xs[b]``, the values rounded half away from zero in ``xq[32 b ..]``."""
    xs[b] = T.float32(0)
    for k in range(QBLOCK):
        xs[b] = T.max(xs[b], T.fabs(x[0, 0, b * QBLOCK + k]))
    xs[b] = xs[b] / T.float32(127)
    for k in T.vectorized(QBLOCK):
        xq[b * QBLOCK + k] = T.Cast("int8", T.round(x[0, 0, b * QBLOCK + k] / T.Select(
            xs[b] > T.float32(0), xs[b], T.float32(1))))
