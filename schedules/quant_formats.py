"""GGML block formats of the dense quantized kernels: sizes and numpy (de)quantization (TIR element access is
in :mod:`xpuc.schedules.quant_tir`; this module imports no TVM, so the frontends that read it stay light).

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

"""

from __future__ import annotations

import numpy as np

from xpuc.runtime.formats.bundle import QBLOCK, dequantize_q4, quantize_q4

# format -> (values per block, bytes per block)
BLOCKS = {"q4_0": (32, 18), "q4_1": (32, 20), "q5_0": (32, 22), "q8_0": (32, 34),
          "q4_k": (256, 144), "q5_k": (256, 176), "q6_k": (256, 210)}
# GGUF tensor type name -> format with a kernel
GGUF_FORMATS = {"Q4_0": "q4_0", "Q4_1": "q4_1", "Q5_0": "q5_0", "Q8_0": "q8_0",
                "Q4_K": "q4_k", "Q5_K": "q5_k", "Q6_K": "q6_k"}
QUANTIZABLE = ("q4_0", "q4_1", "q5_0", "q8_0")  # formats xpuc can quantize float weights into
#: formats with int8 dot products, and the offset each folds into the accumulators' initial value
INT8_FORMATS = {"q4_0": 8, "q4_1": 0, "q5_0": 16, "q8_0": 128, "q4_k": 0, "q5_k": 0, "q6_k": 32}


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
