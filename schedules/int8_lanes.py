"""int8 decode GEMV over row groups stored lane by lane (x86 AVX-512 VNNI): 8 rows per 512-bit dot product.

:mod:`xpuc.schedules.int8_gemv` takes a row's 32-value block as one 256-bit vector: per block and row it expands
the values (q5_0: the 32 high bits too), runs one ``vpdpbusd``, converts, and scales by the row's ``d`` — scalar
work per row that makes it compute-bound (q5_0 896x9728: ≈ 17-22 GB/s of weights on 2 Zen 4 cores). Here the
8 rows of a row group's block are stored so that one 512-bit register holds 8 values of each of the 8 rows, int32
lane ``2 r + h`` being row ``r``'s values ``8 i + 4 h .. 8 i + 4 h + 3`` of register ``i``: with the token's 8
activations broadcast, four ``vpdpbusd`` cover the block for all 8 rows, the 8 rows' scales are one vector
conversion, and q5_0's high bits are one 64-bit mask per register.

The (row group, block) chunk holds the same bytes as the 8 GGUF blocks, rearranged (nothing re-quantized):

* bytes 0..15: the rows' fp16 scales ``d`` (row ``r`` at ``2 r``); q4_1: 16..31 their fp16 minimums ``m``;
* q5_0: 16..47 the high bits, byte ``8 i + r`` = byte ``i`` of row ``r``'s ``qh`` (bit ``b`` of word ``i`` is
  value ``8 i + b % 8`` of row ``b // 8``);
* the values. q4_0 / q4_1 / q5_0: two 64-byte chunks, byte ``64 c + 8 r + k`` = byte ``8 c + k`` of row ``r``'s
  nibbles (low: value ``8 c + k``, high: ``16 + 8 c + k``); q8_0: four, byte ``64 i + 8 r + k`` = value
  ``8 i + k`` of row ``r``.

Kernels index the chunk through a flat ``(groups, blocks, R * block bytes)`` view of the 4-D storage (a
``T.decl_buffer`` over its data). Measured on the 896x9728 q5_0 GEMV (2 threads, AMD Zen 4, weights streamed): 168 us
against 278-360 us for :mod:`~xpuc.schedules.int8_gemv`'s kernel.
"""

from __future__ import annotations

import numpy as np
from tvm.script import tirx as T

from xpuc.schedules.quant_formats import BLOCKS, INT8_FORMATS, QBLOCK
from xpuc.schedules.quant_tir import PREFETCH_GROUPS

__all__ = ["LANE_FORMATS", "LANE_ROWS", "from_lanes", "lane_buffers", "lane_element", "lane_parts",
           "lane_unit_parts", "to_lanes", "uses_lanes"]

#: formats with the lane layout (32-value blocks, one scale each)
LANE_FORMATS = ("q4_0", "q4_1", "q5_0", "q8_0")
LANE_ROWS = 8
_QS_IN_BLOCK = {"q4_0": 2, "q4_1": 4, "q5_0": 6, "q8_0": 2}  # where a GGUF block's values start


def uses_lanes(fmt: str | None, out_features: int, int8: bool) -> bool:
    """Whether an (out_features, in) matrix in ``fmt`` is stored lane by lane: int8 dot products, a format of
    :data:`LANE_FORMATS`, and rows in whole 16-row prefill tasks (so 8-row groups) — the storage and the kernels
    of a build both decide by this."""
    return bool(int8) and fmt in LANE_FORMATS and out_features % 16 == 0


def _offsets(fmt: str) -> tuple[int | None, int | None, int]:
    """Chunk offsets of the minimums (q4_1), the high bits (q5_0) and the values."""
    m = 16 if fmt == "q4_1" else None
    qh = 16 if fmt == "q5_0" else None
    qs = {"q4_0": 16, "q4_1": 32, "q5_0": 48, "q8_0": 16}[fmt]
    return m, qh, qs


def to_lanes(storage: np.ndarray, fmt: str) -> np.ndarray:
    """Row-interleaved storage ``(groups, blocks, 8, block bytes)`` -> the lane layout, same shape and bytes."""
    ng, nb, r, bb = storage.shape
    if fmt not in LANE_FORMATS or r != LANE_ROWS or bb != BLOCKS[fmt][1]:
        raise ValueError(f"no lane layout for {fmt} storage of shape {storage.shape}")
    parts = [storage[..., 0:2].reshape(ng, nb, 16)]
    if fmt == "q4_1":
        parts.append(storage[..., 2:4].reshape(ng, nb, 16))
    if fmt == "q5_0":
        parts.append(storage[..., 2:6].transpose(0, 1, 3, 2).reshape(ng, nb, 32))
    qs = storage[..., _QS_IN_BLOCK[fmt]:]
    n = qs.shape[-1] // 8
    parts.append(qs.reshape(ng, nb, r, n, 8).transpose(0, 1, 3, 2, 4).reshape(ng, nb, r * qs.shape[-1]))
    return np.ascontiguousarray(np.concatenate(parts, axis=2).reshape(storage.shape))


def from_lanes(storage: np.ndarray, fmt: str) -> np.ndarray:
    """Inverse of :func:`to_lanes`."""
    ng, nb, r, bb = storage.shape
    flat = storage.reshape(ng, nb, r * bb)
    m_at, qh_at, qs_at = _offsets(fmt)
    parts = [flat[..., 0:16].reshape(ng, nb, r, 2)]
    if m_at is not None:
        parts.append(flat[..., m_at:m_at + 16].reshape(ng, nb, r, 2))
    if qh_at is not None:
        parts.append(flat[..., qh_at:qh_at + 32].reshape(ng, nb, 4, r).transpose(0, 1, 3, 2))
    nq = bb - _QS_IN_BLOCK[fmt]
    parts.append(flat[..., qs_at:].reshape(ng, nb, nq // 8, r, 8).transpose(0, 1, 3, 2, 4).reshape(ng, nb, r, nq))
    return np.ascontiguousarray(np.concatenate(parts, axis=3))


def _u8(v: int, lanes: int):
    return T.Broadcast(T.uint8(v), lanes)


def _half(w, g, sb, at):
    bits = T.Cast("uint16", w[g, sb, at]) | T.shift_left(T.Cast("uint16", w[g, sb, at + 1]), T.uint16(8))
    return T.Cast("float32", T.reinterpret("float16", bits))


def _pairs(w, g, sb, at):
    """The 8 rows' fp16 fields at ``at`` as float32x16, each row's twice (lanes 2 r and 2 r + 1)."""
    f = T.Cast("float32x8", T.reinterpret("float16x8", w[g, sb, T.Ramp(at, 1, 16)]))
    return T.Shuffle([f, f], [lane // 2 for lane in range(16)])


def _register(fmt: str, w, g, sb, i):
    """Register ``i`` (an unrolled loop variable) of the chunk: values ``8 i .. 8 i + 7`` of the 8 rows as unsigned
    bytes (uint8x64)."""
    _, qh_at, qs_at = _offsets(fmt)
    if fmt == "q8_0":  # signed bytes plus 128 (top bit flipped)
        return T.bitwise_xor(w[g, sb, T.Ramp(qs_at + 64 * i, 1, 64)], _u8(128, 64))
    q = w[g, sb, T.Ramp(qs_at + 64 * (i % 2), 1, 64)]
    v = T.bitwise_and(T.shift_right(q, T.Broadcast(T.Cast("uint8", (i // 2) * 4), 64)), _u8(15, 64))
    if fmt != "q5_0":
        return v
    word = T.Shuffle([w[g, sb, T.Ramp(qh_at + 8 * i, 1, 8)]] * 8, [b // 8 for b in range(64)])  # byte r -> 8 r..
    bit = T.shift_left(_u8(1, 64), T.bitwise_and(T.Ramp(T.uint8(0), T.uint8(1), 64), _u8(7, 64)))
    return T.Select(T.bitwise_and(word, bit) != _u8(0, 64), T.bitwise_or(v, _u8(16, 64)), v)


def lane_buffers(k: int):
    """Allocate the quantized activations of :func:`lane_parts` for ``k`` inputs (inside a TIR body): int8 values,
    block scales, the accumulators' initial vectors (16 int32 a block) and half the blocks' scaled sums."""
    return (T.alloc_buffer((k,), "int8", scope="global"), T.alloc_buffer((k // QBLOCK,), "float32", scope="global"),
            T.alloc_buffer((k // 2,), "int32", scope="global"),
            T.alloc_buffer((k // QBLOCK,), "float32", scope="global"))


def lane_parts(wshape: tuple[int, int, int, int], fmt: str):
    """The TIR macros ``(quantize, group_dot8)`` of int8 dot products over lane-layout weights: the interface of
    :func:`xpuc.schedules.int8_gemv.int8_parts`, with ``xv`` from :func:`lane_buffers` and ``w`` the flat view.

    ``quantize(x, xv)`` quantizes ``x[0, 0]`` to int8 blocks of 32 (as ``int8_gemv``) and stores per block the
    initial accumulators (``-offset x`` the block's sum in the even lanes: the format's offset folded in) and half
    its scaled sum (q4_1's minimums, added to both lanes of a row). ``group_dot8(xv, acc, w, g, last)`` leaves the
    8 rows' dot products in ``acc[r, 0]`` (``acc``: (8, 8) float32).
    """
    if fmt not in LANE_FORMATS or wshape[2] != LANE_ROWS:
        raise ValueError(f"no lane layout for {fmt} storage of shape {wshape}")
    _, NS, R, BB = wshape
    OFFSET = INT8_FORMATS[fmt]
    m_at, _, _ = _offsets(fmt)

    def vnni(acc, u8, s8):
        return T.call_llvm_pure_intrin("int32x16", "llvm.x86.avx512.vpdpbusd.512", acc, u8, s8)

    def x8(xq, b, i):
        """Activations ``8 i .. 8 i + 7`` of block ``b``, broadcast to the 8 rows' lanes."""
        return T.reinterpret("int8x64", T.Broadcast(T.reinterpret("int64", xq[T.Ramp(b * QBLOCK + 8 * i, 1, 8)]), 8))

    @T.macro
    def quantize(x, xv):
        xq, xs, xinit, xhalf = xv[0], xv[1], xv[2], xv[3]
        for b in range(NS):
            xs[b] = T.float32(0)
            for k in range(QBLOCK):
                xs[b] = T.max(xs[b], T.fabs(x[0, 0, b * QBLOCK + k]))
            xs[b] = xs[b] / T.float32(127)
            for k in T.vectorized(QBLOCK):
                xq[b * QBLOCK + k] = T.Cast("int8", T.round(x[0, 0, b * QBLOCK + k] / T.Select(
                    xs[b] > T.float32(0), xs[b], T.float32(1))))
            for lane in range(16):
                xinit[b * 16 + lane] = T.int32(0)
            for k in range(QBLOCK):
                xinit[b * 16] = xinit[b * 16] + T.Cast("int32", xq[b * QBLOCK + k])
            xhalf[b] = T.Cast("float32", xinit[b * 16]) * xs[b] * T.float32(0.5)
            xinit[b * 16] = xinit[b * 16] * T.int32(-OFFSET)
            for r in range(1, R):
                xinit[b * 16 + 2 * r] = xinit[b * 16]

    @T.macro
    def group_dot8(xv, acc, w, g, last):
        xq, xs, xinit, xhalf = xv[0], xv[1], xv[2], xv[3]
        flat = T.decl_buffer((R * 8,), "float32", data=acc.data)
        flat[T.Ramp(0, 1, 16)] = T.Broadcast(T.float32(0), 16)
        for sb in range(NS):
            for c in range((R * BB + 63) // 64):  # the same block of the group PREFETCH_GROUPS ahead
                T.evaluate(T.call_llvm_intrin("void", "llvm.prefetch.p0", T.address_of(
                    w[T.min(g + PREFETCH_GROUPS, last), sb, c * 64]), T.int32(0), T.int32(3), T.int32(1)))
            dot = T.alloc_buffer((16,), "int32", scope="global")  # the block's int32 lanes (kept in a register)
            dot[T.Ramp(0, 1, 16)] = xinit[T.Ramp(sb * 16, 1, 16)]
            for i in T.unroll(4):
                dot[T.Ramp(0, 1, 16)] = vnni(dot[T.Ramp(0, 1, 16)], _register(fmt, w, g, sb, i), x8(xq, sb, i))
            if m_at is not None:
                flat[T.Ramp(0, 1, 16)] = flat[T.Ramp(0, 1, 16)] + T.Cast("float32x16", dot[T.Ramp(0, 1, 16)]) * (
                    _pairs(w, g, sb, 0) * T.Broadcast(xs[sb], 16)) + _pairs(w, g, sb, m_at) * T.Broadcast(
                    xhalf[sb], 16)
            else:
                flat[T.Ramp(0, 1, 16)] = flat[T.Ramp(0, 1, 16)] + T.Cast("float32x16", dot[T.Ramp(0, 1, 16)]) * (
                    _pairs(w, g, sb, 0) * T.Broadcast(xs[sb], 16))
        for q in T.unroll(R):  # row r's sum lands on acc[r, 0] (flat lane >= 8 r): last row first, so no lane
            acc[R - 1 - q, 0] = flat[2 * (R - 1 - q)] + flat[2 * (R - 1 - q) + 1]  # still to be read is overwritten

    return quantize, group_dot8


def lane_unit_parts(fmt: str):
    """``(values, scale, corr)`` of :func:`xpuc.schedules.int8_gemv.unit_parts` over the lane layout's flat view
    (``w[g, sb, byte]``; ``j`` is always 0): row ``r``'s 32 values as unsigned bytes in value order, its ``d``, and
    q4_1's minimum (``None`` for the offset formats)."""
    if fmt not in LANE_FORMATS:
        raise ValueError(f"no lane layout for '{fmt}' (have: {', '.join(LANE_FORMATS)})")
    m_at, qh_at, qs_at = _offsets(fmt)

    def values(w, g, sb, j, r):
        if fmt == "q8_0":
            q = T.Shuffle([w[g, sb, T.Ramp(qs_at + 64 * i + 8 * r, 1, 8)] for i in range(4)], list(range(32)))
            return T.bitwise_xor(q, _u8(128, 32))
        q = T.Shuffle([w[g, sb, T.Ramp(qs_at + 64 * c + 8 * r, 1, 8)] for c in range(2)], list(range(16)))
        v = T.Shuffle([T.bitwise_and(q, _u8(15, 16)), T.shift_right(q, _u8(4, 16))], list(range(32)))
        if fmt != "q5_0":
            return v
        qh = T.Shuffle([T.Broadcast(w[g, sb, qh_at + 8 * i + r], 8) for i in range(4)], list(range(32)))
        bit = T.shift_left(_u8(1, 32), T.bitwise_and(T.Ramp(T.uint8(0), T.uint8(1), 32), _u8(7, 32)))
        return T.bitwise_or(v, T.Select(T.bitwise_and(qh, bit) != _u8(0, 32), _u8(16, 32), _u8(0, 32)))

    def scale(w, g, sb, j, r):
        return _half(w, g, sb, 2 * r)

    def corr(w, g, sb, j, r):
        return _half(w, g, sb, m_at + 2 * r) if m_at is not None else None

    return values, scale, corr


def lane_element(fmt: str):
    """``elem(w, g, sb, j, r, half, l)`` of :func:`xpuc.schedules.quant_tir.element` over the flat view: value
    ``16 half + l`` of row ``r``, dequantized (float32)."""
    if fmt not in LANE_FORMATS:
        raise ValueError(f"no lane layout for '{fmt}' (have: {', '.join(LANE_FORMATS)})")
    m_at, qh_at, qs_at = _offsets(fmt)
    offset = INT8_FORMATS[fmt]

    def elem(w, g, sb, j, r, half, l):
        if fmt == "q8_0":
            v = 16 * half + l
            q = T.Cast("float32", T.reinterpret("int8", w[g, sb, qs_at + 64 * (v // 8) + 8 * r + v % 8]))
            return q * _half(w, g, sb, 2 * r)
        byte = w[g, sb, qs_at + 64 * (l // 8) + 8 * r + l % 8]
        q = T.Cast("int32", T.bitwise_and(T.shift_right(byte, T.Cast("uint8", 4 * half)), T.uint8(15)))
        if fmt == "q5_0":
            v = 16 * half + l
            q = q | T.shift_left(T.Cast("int32", T.bitwise_and(T.shift_right(
                w[g, sb, qh_at + 8 * (v // 8) + r], T.Cast("uint8", v % 8)), T.uint8(1))), 4)
        value = (T.Cast("float32", q) - T.float32(offset)) * _half(w, g, sb, 2 * r)
        return value + _half(w, g, sb, m_at + 2 * r) if m_at is not None else value

    return elem
