"""GGML block formats of the dense quantized kernels: sizes, numpy (de)quantization and TIR element access.

Every format stores a row of a weight matrix as blocks along the input dimension, byte-identical to
llama.cpp's (so a GGUF tensor's rows are used as they are):

========  ======  =====  ============================================================================
format    values  bytes  value of element ``e`` of a block
========  ======  =====  ============================================================================
q4_0      32      18     ``(q - 8) * d``: fp16 ``d``, 16 bytes of nibbles
q4_1      32      20     ``q * d + m``: fp16 ``d``, fp16 ``m``, 16 bytes of nibbles
q5_0      32      22     ``(q - 16) * d``: fp16 ``d``, 32 high bits, 16 bytes of low nibbles
q8_0      32      34     ``q * d``: fp16 ``d``, 32 int8
q4_k      256     144    ``d * sc[j] * q - dmin * m[j]`` over 8 sub-blocks ``j`` of 32 (6-bit sc, m)
q5_k      256     176    as q4_k with a fifth bit per value
q6_k      256     210    ``d * sc[j] * (q - 32)`` over 16 sub-blocks of 16 (int8 sc)
========  ======  =====  ============================================================================

The kernels walk a row in units of 32 values (``half`` 0/1 x 16 lanes); a 256-value block is 8 such units
(``SUB``). :func:`element` returns the TIR expression of one value at (row group ``g``, block ``sb``, unit
``j`` of the block, row ``r`` of the group, ``half``, lane ``l``); everything but the lane is a constant or
a scalar, so the lanes vectorize.
"""

from __future__ import annotations

import numpy as np
from tvm.script import tirx as T

from xpuc.runtime.formats.bundle import QBLOCK, dequantize_q4, quantize_q4

# format -> (values per block, bytes per block)
BLOCKS = {"q4_0": (32, 18), "q4_1": (32, 20), "q5_0": (32, 22), "q8_0": (32, 34),
          "q4_k": (256, 144), "q5_k": (256, 176), "q6_k": (256, 210)}
# GGUF tensor type name -> format with a kernel
GGUF_FORMATS = {"Q4_0": "q4_0", "Q4_1": "q4_1", "Q5_0": "q5_0", "Q8_0": "q8_0",
                "Q4_K": "q4_k", "Q5_K": "q5_k", "Q6_K": "q6_k"}
QUANTIZABLE = ("q4_0", "q4_1", "q5_0", "q8_0")  # formats xpuc can quantize float weights into


def check_format(fmt: str, in_features: int) -> tuple[int, int]:
    """(values, bytes) per block of ``fmt``; a ValueError for an unknown format or a row it cannot tile."""
    if fmt not in BLOCKS:
        raise ValueError(f"unknown quantized format '{fmt}' (known: {', '.join(BLOCKS)})")
    qk, bb = BLOCKS[fmt]
    if in_features % qk:
        raise ValueError(f"{fmt} rows need a multiple of {qk} values, got {in_features}")
    return qk, bb


def _gguf_type(fmt: str):
    import gguf

    return getattr(gguf.GGMLQuantizationType, fmt.upper())


def quantize_rows(w: np.ndarray, fmt: str) -> np.ndarray:
    """(out, in) float matrix -> (out, in/values * bytes) uint8 blocks.

    q4_0 / q4_1 / q8_0 follow llama.cpp's reference quantizers, so a matrix that was dequantized from the same
    format is quantized back to the same bytes; q5_0 uses the ``gguf`` package's. The K formats are only ever
    kept from a GGUF file (no quantizer here): a ValueError.
    """
    check_format(fmt, w.shape[-1])
    if fmt in ("q4_0", "q4_1"):
        return quantize_q4(w, with_min=fmt == "q4_1")
    if fmt == "q8_0":
        x = w.astype(np.float32).reshape(*w.shape[:-1], -1, QBLOCK)
        amax = np.abs(x).max(-1)
        s = (amax / 127.0).astype(np.float16)
        s32 = s.astype(np.float32)
        inv = np.where(s32 > 0, 1.0 / np.where(s32 > 0, s32, 1), 0.0)
        q = np.clip(np.round(x * inv[..., None]), -127, 127).astype(np.int8)
        blocks = np.concatenate([s.view(np.uint8).reshape(*s.shape, 2), q.view(np.uint8)], axis=-1)
        return np.ascontiguousarray(blocks.reshape(*w.shape[:-1], -1))
    if fmt not in QUANTIZABLE:
        raise ValueError(f"xpuc does not quantize into {fmt}; such tensors are kept as the GGUF file stores them")
    import gguf

    return np.ascontiguousarray(gguf.quants.quantize(w.astype(np.float32), _gguf_type(fmt)))


def dequantize_rows(data: np.ndarray, fmt: str) -> np.ndarray:
    """Inverse of :func:`quantize_rows` (float32); any format of :data:`BLOCKS`."""
    if fmt in ("q4_0", "q4_1"):
        return dequantize_q4(data, with_min=fmt == "q4_1")
    if fmt == "q8_0":
        b = data.reshape(*data.shape[:-1], -1, BLOCKS["q8_0"][1])
        s = np.ascontiguousarray(b[..., 0:2]).view(np.float16)[..., 0].astype(np.float32)[..., None]
        v = np.ascontiguousarray(b[..., 2:]).view(np.int8).astype(np.float32) * s
        return v.reshape(*data.shape[:-1], -1)
    import gguf

    return gguf.quants.dequantize(np.ascontiguousarray(data), _gguf_type(fmt)).astype(np.float32)


def _half_float(w, g, sb, r, at):
    bits = T.Cast("uint16", w[g, sb, r, at]) | T.shift_left(T.Cast("uint16", w[g, sb, r, at + 1]), T.uint16(8))
    return T.Cast("float32", T.reinterpret("float16", bits))


def _bits(w, g, sb, r, at, shift, mask: int):
    return T.shift_right(w[g, sb, r, at], T.Cast("uint8", shift)) & T.uint8(mask)


def _k_scale_min(w, g, sb, r, j):
    """q4_k / q5_k: the 6-bit scale and minimum of unit ``j`` (a constant or a loop variable; the scales sit at
    bytes 4..15), as float32."""
    sc = T.if_then_else(j < 4, _bits(w, g, sb, r, 4 + j, 0, 63),
                        _bits(w, g, sb, r, 8 + j, 0, 15) | T.shift_left(_bits(w, g, sb, r, j, 6, 3), T.uint8(4)))
    m = T.if_then_else(j < 4, _bits(w, g, sb, r, 8 + j, 0, 63),
                       _bits(w, g, sb, r, 8 + j, 4, 15) | T.shift_left(_bits(w, g, sb, r, 4 + j, 6, 3), T.uint8(4)))
    return T.Cast("float32", sc), T.Cast("float32", m)


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
            low = T.Cast("int32", _bits(w, g, sb, r, 6 + l, half * 4, 15))
            qh = (T.Cast("int32", w[g, sb, r, 2]) | T.shift_left(T.Cast("int32", w[g, sb, r, 3]), 8)
                  | T.shift_left(T.Cast("int32", w[g, sb, r, 4]), 16)
                  | T.shift_left(T.Cast("int32", w[g, sb, r, 5]), 24))  # lane-invariant word, 32-bit lanes
            high = T.shift_left(T.shift_right(qh, half * 16 + l) & 1, 4)
            q = T.Cast("float32", low | high)
            return (q - T.float32(16)) * _half_float(w, g, sb, r, 0)
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
