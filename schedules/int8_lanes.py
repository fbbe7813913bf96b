"""int8 dot products over the lane layout (x86 AVX-512 VNNI): one 512-bit ``vpdpbusd`` covers 8 rows.

:mod:`xpuc.schedules.int8_gemv` takes a row's 32-value unit as one 256-bit vector: per unit and row it expands
the values, runs one ``vpdpbusd``, converts, and scales by the row's own scale (the K formats: a 6-bit sub-block
scale decoded per row) — scalar work per row that makes it compute-bound (q5_0 896x9728: 17-22 GB/s of weights
on 2 Zen 4 cores, q4_k / q6_k 4864x896: ≈ 15 GB/s). Over the lane layout (:mod:`xpuc.schedules.lane_layout`)
register ``i`` of a unit holds values ``8 i .. 8 i + 7`` of all 8 rows of a row group (int32 lanes ``2 r`` and
``2 r + 1``: row ``r``): with the token's 8 activations broadcast, four ``vpdpbusd`` cover the unit for the 8
rows, and the 8 rows' scales are one vector (the K formats' sub-block scales decoded for 8 rows x 8 units at
once). Measured (2 threads, AMD Zen 4, six copies of the weights in rotation): q5_0 896x9728 111-121 us
against 272-275 us for the per-row kernel, q8_0 896x151936 3.1-3.3 ms against 4.2-4.8 ms.

Kernels index a chunk through a flat ``(groups, blocks, 8 * block bytes)`` view of the 4-D storage (a
``T.decl_buffer`` over its data).
"""

from __future__ import annotations

from tvm.script import tirx as T

from xpuc.schedules.lane_layout import LANE_FORMATS, LANE_ROWS, field_offset
from xpuc.schedules.quant_formats import BLOCKS, INT8_FORMATS, QBLOCK
from xpuc.schedules.quant_tir import int8_block, k_scale_min

__all__ = ["dot_ops", "lane_buffers", "lane_parts", "lane_unit_parts", "lane_values16"]

# Software prefetch of the task's stream this far ahead (a few chunks; 2 row groups ahead, as the per-row kernels
# do, is 44 KB for a 4864-wide q4_k row group: past L1).
PREFETCH_BYTES = 4096
_K_SCALES = ("q4_k", "q5_k")  # 6-bit scales and minimums per 32-value unit
_SPLIT = ("q6_k",)  # int8 scales per 16 values: two accumulators a unit


def _u8(v: int, lanes: int):
    return T.Broadcast(T.uint8(v), lanes)


def _half(w, g, sb, at):
    bits = T.Cast("uint16", w[g, sb, at]) | T.shift_left(T.Cast("uint16", w[g, sb, at + 1]), T.uint16(8))
    return T.Cast("float32", T.reinterpret("float16", bits))


def _halves8(w, g, sb, at):
    """The 8 rows' fp16 field at ``at`` as float32x8."""
    return T.Cast("float32x8", T.reinterpret("float16x8", w[g, sb, T.Ramp(at, 1, 16)]))


def _twice(v8):
    """float32x8 per row -> float32x16 with row ``r``'s value in lanes ``2 r`` and ``2 r + 1``."""
    return T.Shuffle([v8, v8], [lane // 2 for lane in range(16)])


def _shr(v, shift, lanes: int):
    return T.shift_right(v, T.Broadcast(T.Cast("uint8", shift), lanes))


def _and(v, mask: int, lanes: int):
    return T.bitwise_and(v, _u8(mask, lanes))


def _bit_set(v, bit, lanes: int):
    """Lanes of ``v`` whose bit ``bit`` (a constant or an unrolled loop variable) is set."""
    return T.bitwise_and(v, T.shift_left(_u8(1, lanes), T.Broadcast(T.Cast("uint8", bit), lanes))) != _u8(0, lanes)


def _register(fmt: str, w, g, sb, j, i, isa: str):
    """Register ``i`` of unit ``j`` (unrolled loop variables): values ``8 i .. 8 i + 7`` of the unit for the 8 rows,
    as the bytes of the dot products (uint8x64): unsigned, below 128 but for q8_0, whose signed bytes are flipped to
    unsigned for ``vpdpbusd`` (unsigned x signed) and kept as they are for ``sdot`` (signed x signed)."""

    def load(field, run):  # 64 bytes: run ``run`` (8 bytes) of the field for the 8 rows
        return w[g, sb, T.Ramp(field_offset(fmt, field) + 64 * run, 1, 64)]

    if fmt == "q8_0":  # x86: signed bytes plus 128 (top bit flipped)
        return load("qs", i) if isa == "dotprod" else T.bitwise_xor(load("qs", i), _u8(128, 64))
    if fmt in ("q4_0", "q4_1", "q5_0"):
        v = _and(_shr(load("qs", i % 2), (i // 2) * 4, 64), 15, 64)
        if fmt != "q5_0":
            return v
        word = w[g, sb, T.Ramp(field_offset(fmt, "qh") + 8 * i, 1, 8)]  # byte r: row r's bits of the 8 values
        spread = T.Shuffle([word] * 8, [b // 8 for b in range(64)])
        bit = T.shift_left(_u8(1, 64), T.bitwise_and(T.Ramp(T.uint8(0), T.uint8(1), 64), _u8(7, 64)))
        return T.Select(T.bitwise_and(spread, bit) != _u8(0, 64), T.bitwise_or(v, _u8(16, 64)), v)
    if fmt in _K_SCALES:
        v = _and(_shr(load("qs", 4 * (j // 2) + i), (j % 2) * 4, 64), 15, 64)
        if fmt == "q4_k":
            return v
        return T.Select(_bit_set(load("qh", i), j, 64), T.bitwise_or(v, _u8(16, 64)), v)
    a, t = j // 4, j % 4  # q6_k: the 128-value half and the unit in it
    low = _and(_shr(load("ql", 4 * (2 * a + t % 2) + i), (t // 2) * 4, 64), 15, 64)
    return T.bitwise_or(low, T.shift_left(_and(_shr(load("qh", 4 * a + i), 2 * t, 64), 3, 64), _u8(4, 64)))


def lane_buffers(k: int):
    """Allocate the quantized activations of :func:`lane_parts` for ``k`` inputs (inside a TIR body): int8 values,
    the 32-value blocks' scales, initial accumulators (16 int32 per 16 values) and half the blocks' scaled sums."""
    return (T.alloc_buffer((k,), "int8", scope="global"), T.alloc_buffer((k // QBLOCK,), "float32", scope="global"),
            T.alloc_buffer((k,), "int32", scope="global"), T.alloc_buffer((k // QBLOCK,), "float32", scope="global"))


def dot_ops(isa: str):
    """``dot(acc, values, x)``: ``acc`` (int32x16) plus the 4-byte dot products of ``values`` (uint8x64, each below
    128 where ``isa`` is ``dotprod``) and ``x`` (int8x64) — one 512-bit ``vpdpbusd`` (``avx512vnni``), or four
    128-bit ``sdot`` of 2 rows each (``dotprod``, aarch64)."""
    if isa == "avx512vnni":
        def dot(acc, values, x):
            return T.call_llvm_pure_intrin("int32x16", "llvm.x86.avx512.vpdpbusd.512", acc, values, x)
    elif isa == "dotprod":
        def dot(acc, values, x):
            signed = T.reinterpret("int8x64", values)
            quarters = [T.call_llvm_pure_intrin(
                "int32x4", "llvm.aarch64.neon.sdot.v4i32.v16i8", T.Shuffle([acc], list(range(4 * q, 4 * q + 4))),
                T.Shuffle([signed], list(range(16 * q, 16 * q + 16))), T.Shuffle([x], list(range(16 * q, 16 * q + 16))))
                for q in range(4)]
            return T.Shuffle(quarters, list(range(16)))
    else:
        raise ValueError(f"no int8 dot products for isa '{isa}' (have: avx512vnni, dotprod)")
    return dot


def lane_parts(wshape: tuple[int, int, int, int], fmt: str, isa: str = "avx512vnni"):
    """The TIR macros ``(quantize, group_dot8)`` of int8 dot products over lane-layout weights: the interface of
    :func:`xpuc.schedules.int8_gemv.int8_parts`, with ``xv`` from :func:`lane_buffers` and ``w`` the flat view.

    ``quantize(x, xv)`` quantizes ``x[0, 0]`` to int8 blocks of 32 (as ``int8_gemv``) and stores the initial
    accumulators (the format's offset times the activations' sum, in the even lanes; q6_k: one per 16 values) and
    half each block's scaled sum (the minimums', added to both lanes of a row). ``group_dot8(xv, acc, w, g, last)``
    leaves the 8 rows' dot products in ``acc[r, 0]`` (``acc``: at least (8, 8) float32). ``isa``: the dot products'
    instructions (:func:`dot_ops`).
    """
    if fmt not in LANE_FORMATS or wshape[2] != LANE_ROWS:
        raise ValueError(f"no lane layout for {fmt} storage of shape {wshape}")
    NG, NS, R, BB = wshape
    SUB = BLOCKS[fmt][0] // QBLOCK
    NB = NS * SUB
    OFFSET = 0 if fmt == "q8_0" and isa == "dotprod" else INT8_FORMATS[fmt]
    D = field_offset(fmt, "d")
    MIN = field_offset(fmt, "m") if fmt == "q4_1" else field_offset(fmt, "dmin") if fmt in _K_SCALES else None
    SC = field_offset(fmt, "scales") if fmt in _K_SCALES + _SPLIT else None

    vnni = dot_ops(isa)

    def x8(xq, u, i):
        """Activations ``8 i .. 8 i + 7`` of unit ``u``, broadcast to the 8 rows' lanes."""
        return T.reinterpret("int8x64", T.Broadcast(T.reinterpret("int64", xq[T.Ramp(u * QBLOCK + 8 * i, 1, 8)]), 8))

    def scale8(w, g, sb, j, h, scm):
        """The 8 rows' scale of unit ``j`` (q6_k: of its 16-value half ``h``), float32x8."""
        d = _halves8(w, g, sb, D)
        if fmt in _K_SCALES:
            return d * T.Cast("float32x8", scm[T.Ramp(8 * j, 1, 8)])
        if fmt in _SPLIT:
            return d * T.Cast("float32x8", T.reinterpret("int8x8", w[g, sb, T.Ramp(SC + 8 * (2 * j + h), 1, 8)]))
        return d

    def min8(w, g, sb, j, scm):
        """The 8 rows' weight of the activations' sum in unit ``j`` (q4_1's ``m``, the K formats' ``-dmin m``)."""
        if fmt in _K_SCALES:
            return T.float32(0) - _halves8(w, g, sb, MIN) * T.Cast("float32x8", scm[T.Ramp(64 + 8 * j, 1, 8)])
        return _halves8(w, g, sb, MIN)

    @T.macro
    def quantize(x, xv):
        xq, xs, xinit, xhalf = xv[0], xv[1], xv[2], xv[3]
        for b in range(NB):
            int8_block(x, b, xq, xs)
            for lane in range(32):
                xinit[b * 32 + lane] = T.int32(0)
            for k in range(QBLOCK):  # the halves' sums in lanes 0 and 16
                xinit[b * 32 + k // 16 * 16] = xinit[b * 32 + k // 16 * 16] + T.Cast("int32", xq[b * QBLOCK + k])
            xhalf[b] = T.Cast("float32", xinit[b * 32] + xinit[b * 32 + 16]) * xs[b] * T.float32(0.5)
            if fmt in _SPLIT:
                for h in range(2):
                    xinit[b * 32 + h * 16] = xinit[b * 32 + h * 16] * T.int32(-OFFSET)
                    for r in range(1, R):
                        xinit[b * 32 + h * 16 + 2 * r] = xinit[b * 32 + h * 16]
            else:
                xinit[b * 32] = (xinit[b * 32] + xinit[b * 32 + 16]) * T.int32(-OFFSET)
                xinit[b * 32 + 16] = T.int32(0)
                for r in range(1, R):
                    xinit[b * 32 + 2 * r] = xinit[b * 32]

    @T.macro
    def group_dot8(xv, acc, w, g, last):
        xq, xs, xinit, xhalf = xv[0], xv[1], xv[2], xv[3]
        flat = T.decl_buffer((R * 8,), "float32", data=acc.data)
        flat[T.Ramp(0, 1, 16)] = T.Broadcast(T.float32(0), 16)
        scm = T.alloc_buffer((128,), "uint8", scope="global")  # q4_k / q5_k: the 8 units' scales, then minimums
        stream = T.decl_buffer((NG * NS * R * BB,), "uint8", data=w.data)
        for sb in range(NS):
            ahead: T.let[T.int32] = T.min((g * NS + sb) * (R * BB) + PREFETCH_BYTES, (NG * NS - 1) * (R * BB))
            for c in range((R * BB + 63) // 64):  # the chunk PREFETCH_BYTES ahead in the task's stream
                T.evaluate(T.call_llvm_intrin("void", "llvm.prefetch.p0", T.address_of(stream[ahead + c * 64]),
                                              T.int32(0), T.int32(3), T.int32(1)))
            if fmt in _K_SCALES:  # 6-bit fields of the 12 scale bytes, for 8 units x 8 rows at once
                sa = w[g, sb, T.Ramp(SC, 1, 32)]  # bytes 0..3 of the rows
                sm = w[g, sb, T.Ramp(SC + 32, 1, 32)]  # 4..7
                sh = w[g, sb, T.Ramp(SC + 64, 1, 32)]  # 8..11
                scm[T.Ramp(0, 1, 32)] = _and(sa, 63, 32)
                scm[T.Ramp(32, 1, 32)] = _and(sh, 15, 32) | T.shift_left(_shr(sa, 6, 32), _u8(4, 32))
                scm[T.Ramp(64, 1, 32)] = _and(sm, 63, 32)
                scm[T.Ramp(96, 1, 32)] = _shr(sh, 4, 32) | T.shift_left(_shr(sm, 6, 32), _u8(4, 32))
            for j in T.unroll(SUB):
                dot = T.alloc_buffer((2, 16), "int32", scope="global")  # the unit's int32 lanes (registers)
                if fmt in _SPLIT:
                    for h in T.unroll(2):
                        dot[h, T.Ramp(0, 1, 16)] = xinit[T.Ramp((sb * SUB + j) * 32 + h * 16, 1, 16)]
                        for i in T.unroll(2):
                            dot[h, T.Ramp(0, 1, 16)] = vnni(dot[h, T.Ramp(0, 1, 16)],
                                                            _register(fmt, w, g, sb, j, 2 * h + i, isa),
                                                            x8(xq, sb * SUB + j, 2 * h + i))
                    flat[T.Ramp(0, 1, 16)] = flat[T.Ramp(0, 1, 16)] + (T.Cast(
                        "float32x16", dot[0, T.Ramp(0, 1, 16)]) * _twice(scale8(w, g, sb, j, 0, scm)) + T.Cast(
                        "float32x16", dot[1, T.Ramp(0, 1, 16)]) * _twice(scale8(w, g, sb, j, 1, scm))) * T.Broadcast(
                        xs[sb * SUB + j], 16)
                else:
                    dot[0, T.Ramp(0, 1, 16)] = xinit[T.Ramp((sb * SUB + j) * 32, 1, 16)]
                    for i in T.unroll(4):
                        dot[0, T.Ramp(0, 1, 16)] = vnni(dot[0, T.Ramp(0, 1, 16)], _register(fmt, w, g, sb, j, i, isa),
                                                        x8(xq, sb * SUB + j, i))
                    if MIN is not None:
                        flat[T.Ramp(0, 1, 16)] = flat[T.Ramp(0, 1, 16)] + T.Cast(
                            "float32x16", dot[0, T.Ramp(0, 1, 16)]) * _twice(scale8(w, g, sb, j, 0, scm)) * T.Broadcast(
                            xs[sb * SUB + j], 16) + _twice(min8(w, g, sb, j, scm)) * T.Broadcast(
                            xhalf[sb * SUB + j], 16)
                    else:
                        flat[T.Ramp(0, 1, 16)] = flat[T.Ramp(0, 1, 16)] + T.Cast(
                            "float32x16", dot[0, T.Ramp(0, 1, 16)]) * _twice(scale8(w, g, sb, j, 0, scm)) * T.Broadcast(
                            xs[sb * SUB + j], 16)
        for q in T.unroll(R):  # row r's sum lands on acc[r, 0] (flat lane >= 8 r): last row first, so no lane
            acc[R - 1 - q, 0] = flat[2 * (R - 1 - q)] + flat[2 * (R - 1 - q) + 1]  # still to be read is overwritten

    return quantize, group_dot8


def _row_runs(fmt: str, w, g, sb, r, field: str, first: int, count: int):
    """Row ``r``'s bytes ``8 first .. 8 (first + count) - 1`` of ``field`` (runs of 8), as uint8x(8 count)."""
    at = field_offset(fmt, field) + 8 * r
    return T.Shuffle([w[g, sb, T.Ramp(at + 64 * (first + q), 1, 8)] for q in range(count)], list(range(8 * count)))


def _row_values(fmt: str, w, g, sb, j, r):
    """Row ``r``'s 32 values of unit ``j`` in value order as unsigned bytes (uint8x32; offsets not applied)."""
    if fmt == "q8_0":
        return T.bitwise_xor(_row_runs(fmt, w, g, sb, r, "qs", 0, 4), _u8(128, 32))
    if fmt in ("q4_0", "q4_1", "q5_0"):
        q = _row_runs(fmt, w, g, sb, r, "qs", 0, 2)
        v = T.Shuffle([_and(q, 15, 16), _shr(q, 4, 16)], list(range(32)))
        if fmt != "q5_0":
            return v
        at = field_offset(fmt, "qh") + r
        qh = T.Shuffle([T.Broadcast(w[g, sb, at + 8 * i], 8) for i in range(4)], list(range(32)))  # byte i // 8
        bit = T.shift_left(_u8(1, 32), T.bitwise_and(T.Ramp(T.uint8(0), T.uint8(1), 32), _u8(7, 32)))
        return T.bitwise_or(v, T.Select(T.bitwise_and(qh, bit) != _u8(0, 32), _u8(16, 32), _u8(0, 32)))
    if fmt in _K_SCALES:
        v = _and(_shr(_row_runs(fmt, w, g, sb, r, "qs", 4 * (j // 2), 4), (j % 2) * 4, 32), 15, 32)
        if fmt == "q4_k":
            return v
        high = _bit_set(_row_runs(fmt, w, g, sb, r, "qh", 0, 4), j, 32)
        return T.Select(high, T.bitwise_or(v, _u8(16, 32)), v)
    a, t = j // 4, j % 4  # q6_k
    low = _and(_shr(_row_runs(fmt, w, g, sb, r, "ql", 4 * (2 * a + t % 2), 4), (t // 2) * 4, 32), 15, 32)
    high = _and(_shr(_row_runs(fmt, w, g, sb, r, "qh", 4 * a, 4), 2 * t, 32), 3, 32)
    return T.bitwise_or(low, T.shift_left(high, _u8(4, 32)))


def _row_scale_min(fmt: str, w, g, sb, j, r):
    """Row ``r``'s ``(scale, weight of the values' sum)`` of unit ``j`` (float32; the second ``None`` where the
    format's offset is applied instead)."""
    d = _half(w, g, sb, field_offset(fmt, "d") + 2 * r)
    if fmt in _K_SCALES:
        sc, m = k_scale_min(lambda b: w[g, sb, field_offset(fmt, "scales") + 8 * b + r], j)
        return d * sc, T.float32(0) - _half(w, g, sb, field_offset(fmt, "dmin") + 2 * r) * m
    if fmt == "q4_1":
        return d, _half(w, g, sb, field_offset(fmt, "m") + 2 * r)
    return d, None


def lane_unit_parts(fmt: str):
    """``(values, scale, corr)`` of :func:`xpuc.schedules.int8_gemv.unit_parts` over the lane layout's flat view
    (``w[g, sb, byte]``): row ``r``'s 32 values of unit ``j`` as unsigned bytes in value order, their scale, and
    the weight of the activations' sum (``None`` for the offset formats). Not for q6_k (16-value scales)."""
    if fmt not in LANE_FORMATS or fmt in _SPLIT:
        raise ValueError(f"no lane unit parts for '{fmt}'")

    def values(w, g, sb, j, r):
        return _row_values(fmt, w, g, sb, j, r)

    def scale(w, g, sb, j, r):
        return _row_scale_min(fmt, w, g, sb, j, r)[0]

    def corr(w, g, sb, j, r):
        return _row_scale_min(fmt, w, g, sb, j, r)[1]

    return values, scale, corr


def lane_values16(fmt: str):
    """``vals(w, g, sb, j, r, half)``: row ``r``'s values ``16 half .. 16 half + 15`` of unit ``j``, dequantized
    (float32x16), from the lane layout's flat view — the embedding's and the float32 prefill panel's access."""
    if fmt not in LANE_FORMATS:
        raise ValueError(f"no lane layout for '{fmt}' (have: {', '.join(LANE_FORMATS)})")
    offset = INT8_FORMATS[fmt]

    def vals(w, g, sb, j, r, half):
        unit = _row_values(fmt, w, g, sb, j, r)
        v = T.Select(half == 0, T.Shuffle([unit], list(range(16))), T.Shuffle([unit], list(range(16, 32))))
        q = T.Cast("float32x16", v) - T.Broadcast(T.float32(offset), 16)
        if fmt in _SPLIT:
            at = field_offset(fmt, "scales") + 8 * (2 * j + half) + r
            sc = T.Cast("float32", T.reinterpret("int8", w[g, sb, at]))
            return q * T.Broadcast(_half(w, g, sb, field_offset(fmt, "d") + 2 * r) * sc, 16)
        scale, corr = _row_scale_min(fmt, w, g, sb, j, r)
        return q * T.Broadcast(scale, 16) + T.Broadcast(corr if corr is not None else T.float32(0), 16)

    return vals
