"""The bundled neuron layout of an FFN and its int4 quantization (numpy side of the sparse kernels).

For neuron ``i`` of an FFN with ``d_ff`` neurons and model width ``d``, its *record* holds, side by side,

* gated kinds (``reglu``, ``swiglu``, ``drelu``): ``[gate row i, up row i, down column i]``  (3 x d)
* ``relu`` (not gated, ``down(relu(up x))``):      ``[up row i, down column i]``           (2 x d)

The down projection is stored transposed (its column ``i`` as a row), so that computing it for the
active neurons only is an AXPY per neuron. Records are grouped in clusters of ``C`` neurons; cluster
``j`` holds neurons ``j*C .. j*C+C-1``. The same records are what the flash layout stores.

Weight formats: one array ``w[NCL, C, R, row]`` indexed ``[cluster, neuron in cluster, row, ...]``:

* ``float32`` / ``float16``: ``row`` = d elements.
* ``q4_0``: ``row`` = d/32 blocks of 18 bytes (uint8), byte-identical to GGML's ``block_q4_0``: an fp16
  scale ``s``, then 16 bytes whose low nibbles are the block's first 16 values and whose high nibbles
  are the next 16; value ``(q - 8) * s``.
* ``q4_1``: d/32 blocks of 20 bytes, GGML's ``block_q4_1``: fp16 scale ``s``, fp16 minimum ``m``, 16
  bytes of nibbles; value ``q * s + m``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

FFN_KINDS = ("relu", "reglu", "swiglu", "drelu")
WEIGHT_DTYPES = ("float32", "float16", "q4_0", "q4_1")
QBLOCK = 32


@dataclass(frozen=True)
class BundleLayout:
    """Shape parameters of a bundled FFN."""

    kind: str
    d_model: int
    d_ff: int
    cluster: int
    dtype: str

    def __post_init__(self) -> None:
        if self.kind not in FFN_KINDS:
            raise ValueError(f"unknown FFN kind '{self.kind}' (known: {', '.join(FFN_KINDS)})")
        if self.dtype not in WEIGHT_DTYPES:
            raise ValueError(f"unknown weight dtype '{self.dtype}' (known: {', '.join(WEIGHT_DTYPES)})")
        if self.d_ff % self.cluster:
            raise ValueError(f"d_ff={self.d_ff} is not a multiple of the cluster size {self.cluster}")
        if self.d_model % QBLOCK:
            raise ValueError(f"d_model={self.d_model} is not a multiple of {QBLOCK}")

    @property
    def rows(self) -> int:
        return 2 if self.kind == "relu" else 3

    @property
    def n_clusters(self) -> int:
        return self.d_ff // self.cluster

    @property
    def gated(self) -> bool:
        return self.kind != "relu"

    @property
    def block_bytes(self) -> int:
        """Bytes of one 32-value block (quantized dtypes)."""
        return {"q4_0": 18, "q4_1": 20}[self.dtype]

    @property
    def storage_dtype(self) -> str:
        return self.dtype if self.dtype in ("float32", "float16") else "uint8"

    @property
    def row_length(self) -> int:
        """Elements of the storage dtype per row."""
        if self.dtype in ("float32", "float16"):
            return self.d_model
        return self.d_model // QBLOCK * self.block_bytes

    def shape(self) -> tuple[int, int, int, int]:
        return (self.n_clusters, self.cluster, self.rows, self.row_length)

    def record_bytes(self) -> int:
        """Bytes of one neuron's record (all rows)."""
        return self.rows * self.row_length * np.dtype(self.storage_dtype).itemsize


def quantize_q4(rows: np.ndarray, with_min: bool) -> np.ndarray:
    """Quantize (..., d) float rows into GGML ``block_q4_0`` / ``block_q4_1`` bytes: (..., d/32*18|20)."""
    x = rows.astype(np.float32).reshape(*rows.shape[:-1], -1, QBLOCK)
    if with_min:
        lo, hi = x.min(-1), x.max(-1)
        s = ((hi - lo) / 15.0).astype(np.float16)
        s32 = s.astype(np.float32)
        inv = np.where(s32 > 0, 1.0 / np.where(s32 > 0, s32, 1), 0.0)
        q = np.clip(np.round((x - lo[..., None]) * inv[..., None]), 0, 15).astype(np.uint8)
        head = [s.view(np.uint8).reshape(*s.shape, 2), lo.astype(np.float16).view(np.uint8).reshape(*s.shape, 2)]
    else:
        idx = np.abs(x).argmax(-1)
        amax = np.take_along_axis(x, idx[..., None], -1)[..., 0]
        s = (amax / -8.0).astype(np.float16)
        s32 = s.astype(np.float32)
        inv = np.where(s32 != 0, 1.0 / np.where(s32 != 0, s32, 1), 0.0)
        q = np.clip(np.round(x * inv[..., None] + 8.0), 0, 15).astype(np.uint8)
        head = [s.view(np.uint8).reshape(*s.shape, 2)]
    nib = (q[..., :16] | (q[..., 16:] << 4)).astype(np.uint8)
    blocks = np.concatenate(head + [nib], axis=-1)
    return np.ascontiguousarray(blocks.reshape(*rows.shape[:-1], -1))


def dequantize_q4(data: np.ndarray, with_min: bool) -> np.ndarray:
    """Inverse of :func:`quantize_q4` (float32)."""
    bb = 20 if with_min else 18
    b = data.reshape(*data.shape[:-1], -1, bb)
    s = np.ascontiguousarray(b[..., 0:2]).view(np.float16)[..., 0].astype(np.float32)[..., None]
    nib = b[..., bb - 16:]
    q = np.concatenate([nib & 15, nib >> 4], -1).astype(np.float32)
    if with_min:
        m = np.ascontiguousarray(b[..., 2:4]).view(np.float16)[..., 0].astype(np.float32)[..., None]
        v = q * s + m
    else:
        v = (q - 8.0) * s
    return v.reshape(*data.shape[:-1], -1)


def bundle_ffn(layout: BundleLayout, up: np.ndarray, down: np.ndarray,
               gate: np.ndarray | None = None) -> np.ndarray:
    """Bundle FFN weights given in (out, in) layout: gate/up (d_ff, d), down (d, d_ff) -> ``w``."""
    if layout.gated and gate is None:
        raise ValueError(f"FFN kind '{layout.kind}' needs a gate matrix")
    rows = ([gate] if layout.gated else []) + [up, down.T]
    stacked = np.stack([np.asarray(r, np.float32) for r in rows], axis=1)  # (d_ff, R, d)
    stacked = stacked.reshape(layout.n_clusters, layout.cluster, layout.rows, layout.d_model)
    if layout.dtype in ("float32", "float16"):
        return np.ascontiguousarray(stacked.astype(layout.dtype))
    return quantize_q4(stacked, with_min=layout.dtype == "q4_1")


def dequantize_bundle(layout: BundleLayout, w: np.ndarray) -> np.ndarray:
    """(NCL, C, R, d) float32 view of a bundle, as the kernels see it."""
    if layout.dtype in ("float32", "float16"):
        return w.astype(np.float32)
    return dequantize_q4(w, with_min=layout.dtype == "q4_1")


def activation(kind: str, g: np.ndarray, u: np.ndarray | None, threshold: float = 0.0) -> np.ndarray:
    """Neuron outputs h of an FFN kind given gate and up pre-activations (``relu``: ``g`` is up)."""
    if kind == "relu":
        return np.maximum(g, 0)
    if kind == "reglu":
        return np.maximum(g, 0) * u
    if kind == "drelu":
        return np.maximum(g, 0) * np.maximum(u, 0)
    s = g / (1.0 + np.exp(-g))
    return np.where(np.abs(s) > threshold, s, 0.0) * u


def int8_activations(x: np.ndarray) -> np.ndarray:
    """``x`` as the int8 dot products see it: blocks of 32 values quantized to int8 with the scale max|x|/127
    (rounded half away from zero), dequantized back to float32."""
    b = np.asarray(x, np.float32).reshape(-1, QBLOCK)
    scale = (np.abs(b).max(1, keepdims=True) / np.float32(127)).astype(np.float32)
    v = b / np.where(scale > 0, scale, np.float32(1))
    q = np.where(v >= 0, np.floor(v + np.float32(0.5)), np.ceil(v - np.float32(0.5)))
    return (q.astype(np.float32) * scale).reshape(-1)


def sparse_ffn_reference(layout: BundleLayout, bundle: np.ndarray, x: np.ndarray,
                         clusters: np.ndarray | None, threshold: float = 0.0, int8: bool = False) -> np.ndarray:
    """FFN output over the given active clusters (all clusters when None), float64 numpy; with ``int8``, the gate
    and up dot products see :func:`int8_activations` of ``x``, as the int8 kernels do."""
    w = dequantize_bundle(layout, bundle).astype(np.float64)
    if clusters is not None:
        w = w[np.asarray(clusters, np.int64)]
    w = w.reshape(-1, layout.rows, layout.d_model)
    x = np.asarray(int8_activations(x) if int8 else x, np.float64)
    g = w[:, 0] @ x
    u = w[:, 1] @ x if layout.gated else None
    h = activation(layout.kind, g, u, threshold)
    return (h[:, None] * w[:, layout.rows - 1]).sum(0)
