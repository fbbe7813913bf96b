"""Prefill GEMM over GGML blocks with int8 dot products (x86 with AVX-512 VNNI), llama.cpp's way.

Every token's activations are quantized to int8 blocks of 32 (as in :mod:`xpuc.schedules.int8_gemv`). Each
parallel task takes ``M`` = 16 rows: it unpacks their blocks once (each block as one vector, stored as 8 words)
into a panel of unsigned bytes ordered ``(block, quad, row, 4 values)`` — 4-/5-bit values as they are, q8_0's
signed bytes plus 128 — with each row's block scale ``d`` and correction ``c`` (``-offset * d``: -8 d for q4_0,
-16 d for q5_0, -128 d for q8_0; q4_1's minimum), so that

    y[t, row] = sum_b  d[b, row] * xs[t, b] * I[t, b, row]  +  c[b, row] * xs[t, b] * S[t, b]

with ``I`` the int32 dot product of the block's bytes with the token's int8 values and ``S`` their sum. A
register tile of ``TILE_TOKENS`` tokens x 16 rows runs over the panel: per block and token eight 512-bit
``vpdpbusd`` (16 rows x 4 values each, the token's 4 activations broadcast), one conversion and two FMAs.
Measured at 256 tokens (2 threads, AMD Zen 4): q5_0 896x9728 8.7 ms against 23.5 ms for the float32 GEMM,
q4_1 576x3072 1.6 against 4.7 ms.
"""

from __future__ import annotations

from tvm.script import tirx as T

from xpuc.schedules.int8_gemv import INT8_FORMATS, unit_parts
from xpuc.schedules.int8_lanes import dot_ops, lane_unit_parts
from xpuc.schedules.quant_formats import BLOCKS, QBLOCK

__all__ = ["GEMM_FORMATS", "GEMM_ROWS", "TILE_TOKENS", "int8_gemm"]

#: formats with one scale per 32-value unit (q6_k's 16-value scales keep the float32 GEMM)
GEMM_FORMATS = ("q4_0", "q4_1", "q5_0", "q8_0", "q4_k", "q5_k")

GEMM_ROWS = 16  # one 512-bit vector of int32 accumulators
TILE_TOKENS = 6


def int8_gemm(wshape: tuple[int, int, int, int], fmt: str, n_rows: int, lanes: bool = False,
              isa: str = "avx512vnni"):
    """The TIR macro ``gemm8(x, w, y, n)`` of ``y[0, t] = W @ x[0, t]`` for ``n`` tokens with int8 dot products
    (module docstring); weights of storage shape ``wshape`` in ``fmt`` (one of :data:`INT8_FORMATS`), ``n_rows``
    output rows, a multiple of 16. With ``lanes``, the weights are in the lane layout
    (:mod:`xpuc.schedules.int8_lanes`) and ``w`` is its flat view. ``isa``: the dot products' instructions
    (:func:`~xpuc.schedules.int8_lanes.dot_ops`; on aarch64 four ``sdot`` per 512-bit step, q8_0 kept signed)."""
    if fmt not in GEMM_FORMATS:
        raise ValueError(f"no int8 GEMM for '{fmt}' (have: {', '.join(GEMM_FORMATS)})")
    if n_rows % GEMM_ROWS:
        raise ValueError(f"{n_rows} rows are not a multiple of {GEMM_ROWS}")
    _, NS, R, _ = wshape
    SUB = BLOCKS[fmt][0] // QBLOCK
    NB = NS * SUB  # 32-value units
    K = NB * QBLOCK
    M = GEMM_ROWS
    P = M // R
    TT = TILE_TOKENS
    signed_q8 = fmt == "q8_0" and isa == "dotprod"  # sdot multiplies signed bytes: q8_0's need no flip
    OFFSET = 0 if signed_q8 else INT8_FORMATS[fmt]
    unit_values, scale, corr = lane_unit_parts(fmt) if lanes else unit_parts(fmt)
    vnni = dot_ops(isa)

    def values(w, g, sb, j, r):
        v = unit_values(w, g, sb, j, r)
        return T.bitwise_xor(v, T.Broadcast(T.uint8(128), QBLOCK)) if signed_q8 else v  # undo the flip

    def x4(xq, t, at):
        """The token's 4 int8 activations from ``at``, broadcast to the 64 byte lanes."""
        return T.reinterpret("int8x64", T.Broadcast(T.reinterpret("int32", xq[t, T.Ramp(at, 1, 4)]), 16))

    def correction(w, g, sb, j, r):
        """The weight of the activations' block sum: the format's minimum, or -offset x scale."""
        c = corr(w, g, sb, j, r)
        return c if c is not None else T.float32(-OFFSET) * scale(w, g, sb, j, r)

    def quad(panel, b, k4):
        """Values 4 k4 .. 4 k4 + 3 of block ``b`` of the task's 16 rows: 64 unsigned bytes."""
        return T.reinterpret("uint8x64", panel[T.Ramp((b * 8 + k4) * M, 1, M)])

    @T.macro
    def gemm8(x, w, y, n):
        xq = T.alloc_buffer((n, K), "int8", scope="global")
        xs = T.alloc_buffer((n, NB), "float32", scope="global")
        xsum = T.alloc_buffer((n, NB), "float32", scope="global")  # scale x the block's sum of int8 values
        for t in T.parallel(n):
            for b in range(NB):
                xs[t, b] = T.float32(0)
                for l in range(QBLOCK):
                    xs[t, b] = T.max(xs[t, b], T.fabs(x[0, t, b * QBLOCK + l]))
                xs[t, b] = xs[t, b] / T.float32(127)
                for l in T.vectorized(QBLOCK):
                    xq[t, b * QBLOCK + l] = T.Cast("int8", T.round(x[0, t, b * QBLOCK + l] / T.Select(
                        xs[t, b] > T.float32(0), xs[t, b], T.float32(1))))
                xsum[t, b] = T.float32(0)
                for l in range(QBLOCK):
                    xsum[t, b] = xsum[t, b] + T.Cast("float32", xq[t, b * QBLOCK + l])
                xsum[t, b] = xsum[t, b] * xs[t, b]
        for task in T.parallel(n_rows // M):
            panel = T.alloc_buffer((NB * 8 * M,), "int32", scope="global")  # (block, quad, row): 4 bytes a word
            wd = T.alloc_buffer((NB, M), "float32", scope="global")
            wc = T.alloc_buffer((NB, M), "float32", scope="global")
            iacc = T.alloc_buffer((TT, M), "int32", scope="global")
            facc = T.alloc_buffer((TT, M), "float32", scope="global")
            for p in range(P):
                for r in range(R):
                    for sb in range(NS):
                        for j in T.unroll(SUB):
                            wd[sb * SUB + j, p * R + r] = scale(w, task * P + p, sb, j, r)
                            wc[sb * SUB + j, p * R + r] = correction(w, task * P + p, sb, j, r)
                            panel[T.Ramp((sb * SUB + j) * 8 * M + p * R + r, M, 8)] = T.reinterpret(
                                "int32x8", values(w, task * P + p, sb, j, r))
            for tt in range(n // TT):
                for t in T.unroll(TT):
                    facc[t, T.Ramp(0, 1, M)] = T.Broadcast(T.float32(0), M)
                for b in range(NB):
                    for t in T.unroll(TT):
                        iacc[t, T.Ramp(0, 1, M)] = T.Broadcast(T.int32(0), M)
                    for k4 in T.unroll(QBLOCK // 4):
                        for t in T.unroll(TT):
                            iacc[t, T.Ramp(0, 1, M)] = vnni(iacc[t, T.Ramp(0, 1, M)], quad(panel, b, k4),
                                                            x4(xq, tt * TT + t, b * QBLOCK + k4 * 4))
                    for t in T.unroll(TT):
                        facc[t, T.Ramp(0, 1, M)] = facc[t, T.Ramp(0, 1, M)] + T.Cast(
                            "float32x16", iacc[t, T.Ramp(0, 1, M)]) * wd[b, T.Ramp(0, 1, M)] * T.Broadcast(
                            xs[tt * TT + t, b], M) + wc[b, T.Ramp(0, 1, M)] * T.Broadcast(xsum[tt * TT + t, b], M)
                for t in T.unroll(TT):
                    y[0, tt * TT + t, T.Ramp(task * M, 1, M)] = facc[t, T.Ramp(0, 1, M)]
            for t in range(n // TT * TT, n):
                facc[0, T.Ramp(0, 1, M)] = T.Broadcast(T.float32(0), M)
                for b in range(NB):
                    iacc[0, T.Ramp(0, 1, M)] = T.Broadcast(T.int32(0), M)
                    for k4 in T.unroll(QBLOCK // 4):
                        iacc[0, T.Ramp(0, 1, M)] = vnni(iacc[0, T.Ramp(0, 1, M)], quad(panel, b, k4),
                                                        x4(xq, t, b * QBLOCK + k4 * 4))
                    facc[0, T.Ramp(0, 1, M)] = facc[0, T.Ramp(0, 1, M)] + T.Cast(
                        "float32x16", iacc[0, T.Ramp(0, 1, M)]) * wd[b, T.Ramp(0, 1, M)] * T.Broadcast(
                        xs[t, b], M) + wc[b, T.Ramp(0, 1, M)] * T.Broadcast(xsum[t, b], M)
                y[0, t, T.Ramp(task * M, 1, M)] = facc[0, T.Ramp(0, 1, M)]

    return gemm8
