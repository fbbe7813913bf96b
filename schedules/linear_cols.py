"""A projection over weights stored by input column, whose decode GEMV skips the columns of small inputs.

Activation sparsity in the style of TEAL (training-free): at decode time the inputs of a projection whose
magnitude is at most a calibrated threshold are taken as zero, and the kernel reads only the weight columns
of the inputs that remain. For the reads to shrink, a column must be contiguous, so the matrix is stored by
input column: column ``k`` of ``W`` (out, in) is a run of GGML blocks along the *output* dimension (32-value
formats: q4_0, q4_1, q5_0, q8_0), cut into ``NT`` tiles of ``TILE`` output rows (one decode task each)::

    storage (in, NT, TILE / 32, block bytes) uint8; value (k, t, b, e) = W[t * TILE + 32 * b + e, k]

A skipped column is then one gap of ``out`` values in every task's stream, never a gap the hardware
prefetchers read through.

Measured (AMD Zen 4 guest, 2 threads, q4_1, weights streamed from memory, median of 7 x 100 calls): a
4864 -> 896 projection takes 172 / 86 / 55 us with all / half / 30 % of its columns kept, against 106 us for
the dense int8 row GEMV of :mod:`xpuc.schedules.int8_gemv`; 896 -> 9728 takes 512 / 233 / 98 us against 196
us. The fp32 multiply-adds (about 25 G/s on two Zen 4 threads, whose AVX-512 units are 256 bits wide) bound
the kernel, not the bytes: it beats the int8 row kernel from about half the columns skipped on tall
matrices, and from about 60 % on wide ones.

Kernels (activations fp32, a symbolic number of tokens ``n``):

* one token (decode): the indices of the inputs with ``|x| > thr`` are gathered once; then one parallel task
  per tile accumulates ``x[k] * column_k`` over those indices only (the next columns prefetched), so the bytes
  read scale with the share of inputs kept;
* several tokens (prefill): dense and exact (no threshold), one task per 32 output rows: the block column is
  dequantized into an input-major fp32 panel and multiplied by register tiles of tokens, as
  :func:`xpuc.schedules.linear_quant.linear_quant` does.
"""

from __future__ import annotations

from functools import cache

import numpy as np
from tvm import tirx
from tvm.script import tirx as T

from xpuc.schedules.linear_quant import TILE_TOKENS, panel_gemm
from xpuc.schedules.quant_formats import BLOCKS, QBLOCK, QUANTIZABLE, dequantize_rows, quantize_rows
from xpuc.schedules.quant_tir import _bits, _half_float, element, q5_value

__all__ = ["COLUMN_FORMATS", "column_format", "cols_shape", "dequantize_cols", "linear_cols", "quantize_cols"]

COLUMN_FORMATS = QUANTIZABLE  # 32-value formats: a column's run of blocks along the output dimension
MAX_TILE = 512  # output rows of a decode task: a column's run is at most 16 blocks (320 bytes in q4_1)
PREFETCH_COLUMNS = 4  # kept columns ahead whose runs are prefetched


def column_format(fmt: str | None) -> str:
    """The column format for a matrix stored in ``fmt`` (None: fp16): at least as many bits per value."""
    return {"q4_0": "q4_0", "q4_1": "q4_1", "q4_k": "q4_1", "q5_0": "q5_0", "q5_k": "q5_0"}.get(fmt or "", "q8_0")


def column_tile(out_features: int) -> int:
    """Output rows per decode task: a multiple of 32 dividing ``out_features``, at most :data:`MAX_TILE`; an even
    number of tiles where one exists (two threads share them evenly), else as few as possible."""
    if out_features % QBLOCK:
        raise ValueError(f"column storage needs a multiple of {QBLOCK} output rows, got {out_features}")
    blocks = out_features // QBLOCK
    counts = [n for n in range(1, blocks + 1) if blocks % n == 0 and blocks // n * QBLOCK <= MAX_TILE]
    even = [n for n in counts if n % 2 == 0]
    return out_features // (even or counts)[0]


def cols_shape(in_features: int, out_features: int, fmt: str) -> tuple[int, int, int, int]:
    """Storage shape (uint8) of an (out, in) matrix by column in ``fmt``: (in, tiles, tile / 32, block bytes)."""
    if fmt not in COLUMN_FORMATS:
        raise ValueError(f"column storage needs one of {', '.join(COLUMN_FORMATS)}, got '{fmt}'")
    tile = column_tile(out_features)
    return in_features, out_features // tile, tile // QBLOCK, BLOCKS[fmt][1]


def quantize_cols(w: np.ndarray, fmt: str) -> np.ndarray:
    """(out, in) float matrix -> column storage (:func:`cols_shape`)."""
    out_f, in_f = w.shape
    blocks = quantize_rows(np.ascontiguousarray(w.T, dtype=np.float32), fmt)  # (in, out/32 * bb)
    return blocks.reshape(cols_shape(in_f, out_f, fmt))


def dequantize_cols(data: np.ndarray, fmt: str) -> np.ndarray:
    """Inverse of :func:`quantize_cols`: the (out, in) float32 matrix."""
    in_f, nt, nb, bb = data.shape
    return np.ascontiguousarray(dequantize_rows(data.reshape(in_f, nt * nb * bb), fmt).T)


def column_parts(fmt: str):
    """``(value, scale, offset)`` of a block of column storage: element ``(k, t, b, half * 16 + lane)`` equals
    ``value(w, k, t, b, half, lane) * scale(w, k, t, b) + offset(w, k, t, b)``, so that the decode kernel folds the
    input into the block's scale and sums the offsets once per block (q4_0 / q5_0 / q8_0: ``-8 d`` / ``-16 d`` /
    0; q4_1: its minimum)."""
    bb = BLOCKS[fmt][1]

    def scale(w, k, t, b):
        return _half_float(w, k, t, b, 0)

    if fmt == "q8_0":
        def value(w, k, t, b, half, lane):
            return T.Cast("float32", T.reinterpret("int8", w[k, t, b, 2 + half * 16 + lane]))

        def offset(w, k, t, b):
            return T.float32(0)
    elif fmt == "q5_0":
        def value(w, k, t, b, half, lane):
            return q5_value(w, k, t, b, half, lane)

        def offset(w, k, t, b):
            return T.float32(-16) * _half_float(w, k, t, b, 0)
    else:  # q4_0, q4_1
        def value(w, k, t, b, half, lane):
            return T.Cast("float32", _bits(w, k, t, b, (bb - 16) + lane, half * 4, 15))

        def offset(w, k, t, b):
            return _half_float(w, k, t, b, 2) if fmt == "q4_1" else T.float32(-8) * _half_float(w, k, t, b, 0)
    return value, scale, offset


@cache
def linear_cols(in_features: int, out_features: int, fmt: str) -> tirx.PrimFunc:
    """Return the TIR PrimFunc of ``y = x @ W.T`` over column storage, skipping small inputs when decoding.

    Parameters
    ----------
    in_features, out_features:
        Static matrix shape; ``out_features`` must be a multiple of 32.
    fmt:
        a format of :data:`COLUMN_FORMATS`.

    Returns
    -------
    func : tirx.PrimFunc
        ``(x: (1, n, in) f32, w: cols_shape(in, out, fmt) u8, thr: (1,) f32, y: (1, n, out) f32)``. One token:
        ``y = W[:, keep] @ x[keep]`` with ``keep = |x| > thr`` (``thr < 0`` keeps every input: exact). Several
        tokens: ``y = x @ W.T``, dense.
    """
    K, N = in_features, out_features
    WSHAPE = cols_shape(K, N, fmt)
    _, NT, NB, BB = WSHAPE
    TILE = NB * QBLOCK
    elem = element(fmt)
    value, scale, offset = column_parts(fmt)
    gemm = panel_gemm(K, QBLOCK, TILE_TOKENS)
    LINES = (NB * BB + 63) // 64

    @T.prim_func(private=True, s_tir=True)
    def linear(var_x: T.handle, w: T.Buffer(WSHAPE, "uint8"), thr: T.Buffer((1,), "float32"), var_y: T.handle):
        T.func_attr({"tir.noalias": True, "tirx.is_scheduled": True})
        n = T.int64()
        x = T.match_buffer(var_x, (1, n, K), "float32")
        y = T.match_buffer(var_y, (1, n, N), "float32")
        with T.sblock("root"):
            if n == T.int64(1):
                keep = T.alloc_buffer((K + PREFETCH_COLUMNS,), "int32", scope="global")
                kept = T.alloc_buffer((1,), "int32", scope="global")
                kept[0] = 0
                for k in range(K):
                    if T.fabs(x[0, 0, k]) > thr[0]:
                        keep[kept[0]] = k
                        kept[0] = kept[0] + 1
                for j in range(PREFETCH_COLUMNS):  # prefetches past the last kept column re-fetch column 0
                    keep[kept[0] + j] = 0
                for t in T.parallel(NT):
                    acc = T.alloc_buffer((TILE,), "float32", scope="global")
                    shift = T.alloc_buffer((NB,), "float32", scope="global")  # per block: sum of x_k offset_k
                    for c in T.vectorized(TILE):
                        acc[c] = T.float32(0)
                    for b in range(NB):
                        shift[b] = T.float32(0)
                    for j in range(kept[0]):
                        for line in T.unroll(LINES):
                            T.evaluate(T.call_llvm_intrin(
                                "void", "llvm.prefetch.p0",
                                T.address_of(w[keep[j + PREFETCH_COLUMNS], t, line * 64 // BB, line * 64 % BB]),
                                T.int32(0), T.int32(3), T.int32(1)))
                        k: T.let[T.int32] = keep[j]
                        xk: T.let[T.float32] = x[0, 0, k]
                        for b in T.unroll(NB):
                            xd: T.let[T.float32] = xk * scale(w, k, t, b)
                            for half in T.unroll(2):
                                for lane in T.vectorized(16):
                                    acc[b * QBLOCK + half * 16 + lane] = (
                                        acc[b * QBLOCK + half * 16 + lane] + xd * value(w, k, t, b, half, lane))
                            shift[b] = shift[b] + xk * offset(w, k, t, b)
                    for b in T.unroll(NB):
                        for lane in T.vectorized(QBLOCK):
                            y[0, 0, t * TILE + b * QBLOCK + lane] = acc[b * QBLOCK + lane] + shift[b]
            else:
                for tb in T.parallel(NT * NB):
                    panel = T.alloc_buffer((K, QBLOCK), "float32", scope="global")
                    tile = T.alloc_buffer((TILE_TOKENS, QBLOCK), "float32", scope="global")
                    for k in range(K):
                        for half in T.unroll(2):
                            for lane in T.vectorized(16):
                                panel[k, half * 16 + lane] = elem(w, k, tb // NB, 0, tb % NB, half, lane)
                    gemm(x, panel, tile, y, n, tb * QBLOCK)

    return linear
