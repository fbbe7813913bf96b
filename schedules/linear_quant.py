"""Dense kernels over GGML-quantized weight rows, written directly in TIR.

Each row of a weight matrix ``W`` (out, in) is a sequence of GGML blocks along the input dimension,
byte-identical to llama.cpp's: q4_0, q4_1, q5_0, q8_0 (32 values a block) and the K formats q4_k, q5_k, q6_k
(256 values), see :mod:`xpuc.schedules.quant_formats`; a GGUF model's quantized matrices keep their exact
bytes. The kernels take the blocks of ``R`` = 8 consecutive rows interleaved (:func:`quantize_matrix`,
:func:`interleave_rows`): storage ``(out/R, in/block values, R, block bytes)`` uint8, so that a task computing those
``R`` rows reads one sequential stream (measured on the 576x1536 q4_1 GEMV with weights streamed from memory:
6.4 GB/s against 3.9-4.8 GB/s for row-after-row storage).

Kernels (activations fp32, a symbolic number of tokens ``n``):

* :func:`linear_quant` — ``y[0, t, i] = sum_k x[0, t, k] * W[i, k]``. One token (decode): parallel tasks
  over blocks of ``R`` rows whose 16-lane accumulators share every activation load, weights unpacked in
  registers. Several tokens (prefill): each task dequantizes its rows into an input-major fp32 panel once and
  runs register tiles of 6 tokens x 32 rows over it (SmolLM2's layer GEMMs at 256 tokens: 9.4 ms against 12.9
  ms for the per-token dot products they replace, 2 threads).
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

from xpuc.schedules.int8_gemm import GEMM_FORMATS, GEMM_ROWS, int8_gemm
from xpuc.schedules.int8_gemv import INT8_FORMATS, int8_buffers, int8_gemv, int8_parts
from xpuc.schedules.int8_lanes import lane_buffers, lane_parts, lane_values16
from xpuc.schedules.lane_layout import from_lanes, to_lanes, uses_lanes
from xpuc.schedules.linear import largest_divisor
from xpuc.schedules.quant_formats import (
    BLOCKS,
    QBLOCK,
    check_format,
    dequantize_rows,
    quantize_rows,
)
from xpuc.schedules.quant_tir import PREFETCH_GROUPS, element, prefetch_block
from xpuc.schedules.sparse_ffn import _activation_exprs

__all__ = ["BLOCKS", "dequantize_matrix", "dequantize_rows", "embedding_quant", "gate_up_act_quant",
           "interleave_rows", "linear_quant", "quantize_matrix", "quantize_rows", "quantized_shape"]
LANES = 16


ROW_GROUP = 8


def row_group(out_features: int) -> int:
    """Rows whose blocks are interleaved (``R``): 8, or the largest power of two dividing ``out_features``."""
    return largest_divisor(out_features, ROW_GROUP)


def quantized_shape(in_features: int, out_features: int, fmt: str) -> tuple[int, int, int, int]:
    """Storage shape (uint8) of an (out, in) matrix in ``fmt``: (out/R, in/block values, R, block bytes)."""
    qk, bb = check_format(fmt, in_features)
    R = row_group(out_features)
    return out_features // R, in_features // qk, R, bb


def interleave_rows(rows: np.ndarray, fmt: str, in_features: int, int8: bool = False) -> np.ndarray:
    """(out, in/values * bytes) uint8 blocks (a GGUF tensor's rows) -> the kernels' storage, rows interleaved; for
    the int8 kernels, in the lane layout where :func:`~xpuc.schedules.lane_layout.uses_lanes` says so."""
    nr, nb, r, bb = quantized_shape(in_features, rows.shape[0], fmt)
    if rows.shape != (nr * r, nb * bb):
        raise ValueError(f"{fmt} rows of {in_features} values: expected {(nr * r, nb * bb)} bytes, got {rows.shape}")
    storage = np.ascontiguousarray(rows.reshape(nr, r, nb, bb).transpose(0, 2, 1, 3))
    return to_lanes(storage, fmt) if uses_lanes(fmt, rows.shape[0], int8) else storage


def quantize_matrix(w: np.ndarray, fmt: str, int8: bool = False) -> np.ndarray:
    """(out, in) float matrix -> the kernels' storage (:func:`quantized_shape`): GGML blocks, rows interleaved (the
    lane layout for the int8 kernels where it applies)."""
    return interleave_rows(quantize_rows(w, fmt), fmt, w.shape[1], int8)


def dequantize_matrix(data: np.ndarray, fmt: str, int8: bool = False) -> np.ndarray:
    """Inverse of :func:`quantize_matrix` (float32, (out, in))."""
    nr, nb, r, bb = data.shape
    if uses_lanes(fmt, nr * r, int8):
        data = from_lanes(data, fmt)
    return dequantize_rows(np.ascontiguousarray(data.transpose(0, 2, 1, 3)).reshape(nr * r, nb * bb), fmt)


def _group_dot(elem, NS: int, SUB: int, R: int, bb: int):
    """Macro ``group_dot(x, acc, w, g, last)``: the dot products of x with the ``R`` rows of group ``g``, each
    left in ``acc[r, 0]`` (16-lane accumulators sharing every activation load; group ``g + PREFETCH_GROUPS``,
    at most ``last``, prefetched block by block)."""

    @T.macro
    def group_dot(x, acc, w, g, last):
        for r in T.unroll(R):
            for l in T.vectorized(LANES):
                acc[r, l] = T.float32(0)
        for sb in range(NS):
            prefetch_block(w, g + PREFETCH_GROUPS, sb, last, R, bb)
            for j in T.unroll(SUB):
                for half in T.unroll(2):
                    for r in T.unroll(R):
                        for l in T.vectorized(LANES):
                            acc[r, l] = acc[r, l] + x[0, 0, (sb * SUB + j) * QBLOCK + half * 16 + l] * elem(
                                w, g, sb, j, r, half, l)
        for r in T.unroll(R):
            for l in T.vectorized(8):
                acc[r, l] = acc[r, l] + acc[r, l + 8]
            for l in T.vectorized(4):
                acc[r, l] = acc[r, l] + acc[r, l + 4]
            for l in T.vectorized(2):
                acc[r, l] = acc[r, l] + acc[r, l + 2]
            acc[r, 0] = acc[r, 0] + acc[r, 1]

    return group_dot


#: Tokens per register tile of the prefill GEMM: ``TILE_TOKENS`` x (rows / lanes) accumulators (12 with two
#: vectors of rows), which leaves registers for the weights' loads on AVX2 (16) as on AVX-512 / NEON (32).
TILE_TOKENS = 6


def _gemm_rows(out_features: int, lanes: int) -> int:
    """Rows of one prefill task: two vectors of ``lanes`` (32 on AVX-512), or fewer where they do not divide."""
    return max(largest_divisor(out_features, 2 * lanes), row_group(out_features))


def panel_gemm(K: int, M: int, TT: int):
    """Macro ``gemm(x, panel, tile, y, n, col0)``: ``y[0, :, col0:col0 + M] = x[0] @ panel`` for an input-major
    fp32 ``panel`` (K, M), by register tiles of ``TT`` tokens x ``M`` rows in ``tile`` (TT, M): each step one
    broadcast activation times one row vector per token (no horizontal sums); leftover tokens take a one-token
    tile."""

    @T.macro
    def gemm(x, panel, tile, y, n, col0):
        for tt in range(n // TT):
            for t in T.unroll(TT):
                for c in T.vectorized(M):
                    tile[t, c] = T.float32(0)
            for ko in range(K // 4):
                for ki in T.unroll(4):
                    for t in T.unroll(TT):
                        for c in T.vectorized(M):
                            tile[t, c] = tile[t, c] + x[0, tt * TT + t, ko * 4 + ki] * panel[ko * 4 + ki, c]
            for t in T.unroll(TT):
                for c in T.vectorized(M):
                    y[0, tt * TT + t, col0 + c] = tile[t, c]
        for t in range(n // TT * TT, n):
            for c in T.vectorized(M):
                tile[0, c] = T.float32(0)
            for k in range(K):
                for c in T.vectorized(M):
                    tile[0, c] = tile[0, c] + x[0, t, k] * panel[k, c]
            for c in T.vectorized(M):
                y[0, t, col0 + c] = tile[0, c]

    return gemm


@cache
def linear_quant(in_features: int, out_features: int, fmt: str, lanes: int = LANES,
                 int8: bool = False, isa: str = "avx512vnni") -> tirx.PrimFunc:
    """Return the TIR PrimFunc of ``y = x @ W.T`` with ``W`` in GGML format ``fmt``.

    Parameters
    ----------
    in_features, out_features:
        Static matrix shape; ``in_features`` must be a multiple of 32.
    fmt:
        a format of :data:`~xpuc.schedules.quant_formats.BLOCKS`.
    lanes:
        fp32 lanes of the target's SIMD registers (16 AVX-512, 8 AVX2, 4 NEON); sets the prefill tile.
    int8:
        int8 dot products where ``fmt`` has them, with the weights in the lane layout where
        :func:`~xpuc.schedules.lane_layout.uses_lanes` says so (:mod:`xpuc.schedules.int8_lanes`; otherwise
        :mod:`xpuc.schedules.int8_gemv`): one token, and the prefill GEMM (:mod:`xpuc.schedules.int8_gemm`).
    isa:
        their instructions (:func:`~xpuc.schedules.int8_dot.int8_dot_isa`): ``avx512vnni`` or ``dotprod``
        (aarch64 ``sdot``: the lane GEMV and the prefill GEMM; a one-token product outside the lane layout in
        float32).

    Returns
    -------
    func : tirx.PrimFunc
        ``(x: (1, n, in) f32, w: quantized_shape(in, out) u8, y: (1, n, out) f32)``. One token (decode): one
        parallel task per group of ``R`` interleaved rows. Several tokens (prefill): one task per ``M`` rows
        (two vectors of lanes): the task dequantizes its rows once into an fp32 panel stored input-major
        (``(in, M)``), then runs a register tile of ``TILE_TOKENS`` tokens x ``M`` rows over the panel, each
        step one broadcast activation times one row vector per token (no horizontal sums); leftover tokens
        take a one-token tile.
    """
    K, N = in_features, out_features
    WSHAPE = quantized_shape(K, N, fmt)
    NR, NS, R, BB = WSHAPE
    SUB = BLOCKS[fmt][0] // QBLOCK
    elem = element(fmt)
    group_dot = _group_dot(elem, NS, SUB, R, BB)
    M = _gemm_rows(N, lanes)
    P = M // R  # row groups per prefill task
    TT = TILE_TOKENS
    gemm = panel_gemm(K, M, TT)
    in_lanes = uses_lanes(fmt, N, int8)
    vals16 = lane_values16(fmt) if in_lanes else None
    x86 = isa == "avx512vnni"
    gemv8 = int8_gemv(WSHAPE, fmt, in_lanes, isa) if int8 and fmt in INT8_FORMATS and (x86 or in_lanes) else None
    gemm8 = (int8_gemm(WSHAPE, fmt, N, in_lanes, isa) if int8 and fmt in GEMM_FORMATS and N % GEMM_ROWS == 0
             else None)

    @T.prim_func(private=True, s_tir=True)
    def linear(var_x: T.handle, w: T.Buffer(WSHAPE, "uint8"), var_y: T.handle):
        T.func_attr({"tir.noalias": True, "tirx.is_scheduled": True})
        n = T.int64()
        x = T.match_buffer(var_x, (1, n, K), "float32")
        y = T.match_buffer(var_y, (1, n, N), "float32")
        with T.sblock("root"):
            wf = T.decl_buffer((NR, NS, R * BB), "uint8", data=w.data)  # the lane layout's flat view
            if n == T.int64(1):
                if gemv8 is not None:
                    gemv8(x, wf if in_lanes else w, y)
                else:
                    for ib in T.parallel(NR):
                        acc = T.alloc_buffer((R, LANES), "float32", scope="global")
                        group_dot(x, acc, w, ib, NR - 1)
                        for r in T.unroll(R):
                            y[0, 0, ib * R + r] = acc[r, 0]
            elif gemm8 is not None:
                gemm8(x, wf if in_lanes else w, y, n)
            else:
                for ib in T.parallel(N // M):
                    panel = T.alloc_buffer((K, M), "float32", scope="global")
                    tile = T.alloc_buffer((TT, M), "float32", scope="global")
                    pf = T.decl_buffer((K * M,), "float32", data=panel.data)
                    for p in range(P):
                        for r in range(R):
                            for sb in range(NS):
                                for j in T.unroll(SUB):
                                    for half in T.unroll(2):
                                        if in_lanes:  # 16 values of the row a vector
                                            pf[T.Ramp(((sb * SUB + j) * QBLOCK + half * 16) * M + p * R + r, M,
                                                      16)] = vals16(wf, ib * P + p, sb, j, r, half)
                                        else:
                                            for l in T.vectorized(LANES):
                                                panel[(sb * SUB + j) * QBLOCK + half * 16 + l, p * R + r] = elem(
                                                    w, ib * P + p, sb, j, r, half, l)
                    gemm(x, panel, tile, y, n, ib * M)

    return linear


@cache
def embedding_quant(vocab: int, d: int, fmt: str, int8: bool = False) -> tirx.PrimFunc:
    """``(ids: (1, n) i32, w: quantized_shape(d, vocab) u8, h: (1, n, d) f32)``: the tokens' rows, dequantized
    (``int8``: from the lane layout where the int8 build stores the matrix so, a tied LM head's)."""
    WSHAPE = quantized_shape(d, vocab, fmt)
    NR, NS, R, BB = WSHAPE
    SUB = BLOCKS[fmt][0] // QBLOCK
    lanes = uses_lanes(fmt, vocab, int8)
    elem = element(fmt)
    vals16 = lane_values16(fmt) if lanes else None

    @T.prim_func(private=True, s_tir=True)
    def embedding(var_ids: T.handle, w4: T.Buffer(WSHAPE, "uint8"), var_h: T.handle):
        T.func_attr({"tir.noalias": True})
        n = T.int64()
        ids = T.match_buffer(var_ids, (1, n), "int32")
        h = T.match_buffer(var_h, (1, n, d), "float32")
        with T.sblock("root"):
            wf = T.decl_buffer((NR, NS, R * BB), "uint8", data=w4.data)  # the lane layout's flat view
            for t in range(n):
                for sb in range(NS):
                    for j in T.unroll(SUB):
                        for half in T.unroll(2):
                            if lanes:
                                h[0, t, T.Ramp((sb * SUB + j) * QBLOCK + half * 16, 1, 16)] = vals16(
                                    wf, ids[0, t] // R, sb, j, ids[0, t] % R, half)
                            else:
                                for l in T.vectorized(LANES):
                                    h[0, t, (sb * SUB + j) * QBLOCK + half * 16 + l] = elem(
                                        w4, ids[0, t] // R, sb, j, ids[0, t] % R, half, l)

    return embedding


@cache
def gate_up_act_quant(d: int, d_ff: int, fmt: str, kind: str, int8: bool = False,
                      isa: str = "avx512vnni") -> tirx.PrimFunc:
    """The gate/up half of a gated FFN for one token, skipping the up row of neurons that do not fire.

    Parameters
    ----------
    d, d_ff:
        Model width and number of neurons; the weight is the fused ``[gate; up]`` matrix (2 d_ff, d).
    fmt:
        a format of :data:`~xpuc.schedules.quant_formats.BLOCKS`.
    kind:
        ``swiglu`` (fires when ``|silu(g)| > thr``), ``reglu`` or ``drelu`` (fire when ``g > 0``).
    int8, isa:
        int8 dot products where ``fmt`` has them and their instructions, as for :func:`linear_quant`.

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
    NR, NS, G, BB = WSHAPE
    if d_ff % G:
        raise ValueError(f"d_ff={d_ff} is not a multiple of the row group {G}")
    UP = d_ff // G  # first row group of the up rows
    group_dot = _group_dot(element(fmt), NS, BLOCKS[fmt][0] // QBLOCK, G, BB)
    fires, combine = _activation_exprs(kind)
    @T.macro
    def gated(xa, dot, w, thr, h):
        """Per group of G neurons: the gate rows' dot products (``dot`` over the activations ``xa``), then the up
        rows only if one fires."""
        for grp in T.parallel(d_ff // G):
            acc = T.alloc_buffer((G, LANES), "float32", scope="global")
            up = T.alloc_buffer((G, LANES), "float32", scope="global")
            dot(xa, acc, w, grp, UP - 1)
            fired = T.alloc_buffer((1,), "int32", scope="global")
            fired[0] = 0
            for r in range(G):
                if fires(acc[r, 0], thr[0]):
                    fired[0] = 1
            if fired[0] == 1:
                dot(xa, up, w, UP + grp, NR - 1)
                for r in range(G):
                    h[0, 0, grp * G + r] = combine(acc[r, 0], up[r, 0], thr[0])
            else:
                for r in range(G):
                    h[0, 0, grp * G + r] = T.float32(0)

    lanes = uses_lanes(fmt, 2 * d_ff, int8)
    if int8 and fmt in INT8_FORMATS and (lanes or isa == "avx512vnni"):
        quantize, group_dot8 = lane_parts(WSHAPE, fmt, isa) if lanes else int8_parts(WSHAPE, fmt)
        buffers = lane_buffers if lanes else int8_buffers

        @T.prim_func(private=True, s_tir=True)
        def gate_up_act8(x: T.Buffer((1, 1, d), "float32"), w: T.Buffer(WSHAPE, "uint8"),
                         thr: T.Buffer((1,), "float32"), h: T.Buffer((1, 1, d_ff), "float32")):
            T.func_attr({"tir.noalias": True, "tirx.is_scheduled": True})
            with T.sblock("root"):
                wf = T.decl_buffer((NR, NS, G * BB), "uint8", data=w.data)  # the lane layout's flat view
                xv = buffers(d)
                quantize(x, xv)
                gated(xv, group_dot8, wf if lanes else w, thr, h)

        return gate_up_act8

    @T.prim_func(private=True, s_tir=True)
    def gate_up_act(x: T.Buffer((1, 1, d), "float32"), w: T.Buffer(WSHAPE, "uint8"),
                    thr: T.Buffer((1,), "float32"), h: T.Buffer((1, 1, d_ff), "float32")):
        T.func_attr({"tir.noalias": True, "tirx.is_scheduled": True})
        with T.sblock("root"):
            gated(x, group_dot, w, thr, h)

    return gate_up_act
