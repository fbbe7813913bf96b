"""The lane layout of a row group's GGML blocks: the int8 kernels' storage, 8 rows per 512-bit dot product.

:func:`xpuc.schedules.linear_quant.interleave_rows` stores the blocks of 8 consecutive rows one after the other
(``(groups, blocks, 8, block bytes)``). The lane layout keeps that shape and those bytes and rearranges each
(row group, block) chunk field by field: a field of ``n`` bytes read in runs of ``L`` (the fp16 scales: one
run of 2; the 6-bit / int8 sub-block scales and q5_0's high-bit bytes: runs of 1; the values: runs of 8)
becomes ``n / L`` runs of the 8 rows side by side — byte ``8 L q + L r + k`` of the field is byte ``L q + k``
of row ``r``'s. So the 8 rows' values ``8 i .. 8 i + 7`` of a 32-value unit are one 64-byte vector (row ``r``
in int32 lanes ``2 r`` and ``2 r + 1``), the 8 rows' scales are one 16-byte vector, and q5_0's high bits of
values ``8 i .. 8 i + 7`` are one 64-bit mask. Nothing is re-quantized. This module imports no TVM.
"""

from __future__ import annotations

import numpy as np

from xpuc.schedules.quant_formats import BLOCKS

__all__ = ["LANE_FORMATS", "LANE_ROWS", "field_offset", "from_lanes", "to_lanes", "uses_lanes"]

LANE_ROWS = 8

#: format -> its block's fields in lane order: (name, offset in the GGUF block, bytes, run length)
FIELDS: dict[str, tuple[tuple[str, int, int, int], ...]] = {
    "q4_0": (("d", 0, 2, 2), ("qs", 2, 16, 8)),
    "q4_1": (("d", 0, 2, 2), ("m", 2, 2, 2), ("qs", 4, 16, 8)),
    "q5_0": (("d", 0, 2, 2), ("qh", 2, 4, 1), ("qs", 6, 16, 8)),
    "q8_0": (("d", 0, 2, 2), ("qs", 2, 32, 8)),
    "q4_k": (("d", 0, 2, 2), ("dmin", 2, 2, 2), ("scales", 4, 12, 1), ("qs", 16, 128, 8)),
    "q5_k": (("d", 0, 2, 2), ("dmin", 2, 2, 2), ("scales", 4, 12, 1), ("qh", 16, 32, 8), ("qs", 48, 128, 8)),
    "q6_k": (("d", 208, 2, 2), ("scales", 192, 16, 1), ("ql", 0, 128, 8), ("qh", 128, 64, 8)),
}
#: formats with the lane layout (every format with int8 dot products)
LANE_FORMATS = tuple(FIELDS)


def uses_lanes(fmt: str | None, out_features: int, int8: bool) -> bool:
    """Whether an (out_features, in) matrix in ``fmt`` is stored lane by lane: int8 dot products, a format of
    :data:`LANE_FORMATS`, and rows in whole 16-row prefill tasks (so 8-row groups). A build's storage and its
    kernels both decide by this."""
    return bool(int8) and fmt in LANE_FORMATS and out_features % 16 == 0


def field_offset(fmt: str, name: str) -> int:
    """Offset of field ``name`` in a lane-layout chunk of 8 rows."""
    at = 0
    for field, _, n, _ in FIELDS[fmt]:
        if field == name:
            return at
        at += LANE_ROWS * n
    raise KeyError(f"{fmt} blocks have no field '{name}'")


def _check(storage: np.ndarray, fmt: str) -> None:
    if fmt not in FIELDS or storage.ndim != 4 or storage.shape[2] != LANE_ROWS or storage.shape[3] != BLOCKS[fmt][1]:
        raise ValueError(f"no lane layout for {fmt} storage of shape {storage.shape}")


def to_lanes(storage: np.ndarray, fmt: str) -> np.ndarray:
    """Row-interleaved storage ``(groups, blocks, 8, block bytes)`` -> the lane layout, same shape and bytes."""
    _check(storage, fmt)
    ng, nb, r, _ = storage.shape
    parts = [storage[..., at:at + n].reshape(ng, nb, r, n // run, run).transpose(0, 1, 3, 2, 4).reshape(ng, nb, -1)
             for _, at, n, run in FIELDS[fmt]]
    return np.ascontiguousarray(np.concatenate(parts, axis=2).reshape(storage.shape))


def from_lanes(storage: np.ndarray, fmt: str) -> np.ndarray:
    """Inverse of :func:`to_lanes`."""
    _check(storage, fmt)
    ng, nb, r, bb = storage.shape
    flat = storage.reshape(ng, nb, r * bb)
    out = np.empty_like(storage)
    lane_at = 0
    for _, at, n, run in FIELDS[fmt]:
        part = flat[..., lane_at:lane_at + r * n].reshape(ng, nb, n // run, r, run)
        out[..., at:at + n] = part.transpose(0, 1, 3, 2, 4).reshape(ng, nb, r, n)
        lane_at += r * n
    return out
