"""Flash layout writer: a model's FFN weights as bundled neuron-cluster records in one file.

Per layer, neurons are stored in the order *hot first* (the plan's hot neurons, most frequent first), then
cold: in the profile's co-activation order (:mod:`xpuc.compiler.coactivation`: neurons that fire together side
by side, so that a token's reads merge into fewer, larger requests), or most frequent first
(``xpuc pack --layout frequency``, and profiles recorded before the order was). Every
``C`` consecutive neurons form a cluster record ``[C, R, row]`` in the bundled format of
:mod:`xpuc.runtime.formats.bundle` (gate | up | down column per neuron, fp16 or GGML q4_0/q4_1 blocks).
Layer regions start on 4 KiB boundaries and the file ends on one, so a layer can be streamed with
``O_DIRECT``; single records are read as the 4 KiB-aligned span that covers them (records of neighbouring
neurons share pages, and their reads merge). Every cluster
record has a CRC-32 (``ffn.crc32.npy``), checked after each read; the layout description (``flash.json``,
versioned) holds each layer's neuron order and offsets.

With clusters of one neuron of a gated FFN, records are *split* (``split=True``, PowerInfer-2's int4 layout): a
unit's region holds every neuron's gate row, then (from the next 4 KiB boundary) every neuron's up and down rows,
each part with its own CRC-32. The runtime reads the gate rows of the predicted neurons, computes the gate, and
reads up/down rows only for the neurons that fired. With clusters of 16-32 neurons a cluster's gate almost
always has one firing neuron, so larger clusters keep the whole record (one read per cluster).
"""

from __future__ import annotations

import os
import zlib
from pathlib import Path

import numpy as np

from xpuc.runtime.errors import XpucError
from xpuc.runtime.formats.bundle import BundleLayout, bundle_ffn
from xpuc.runtime.formats.flash import ALIGN, FlashLayout, LayerRegion


def storage_order(hot: list[int], frequency: np.ndarray, coactivation: list[int] | None = None) -> list[int]:
    """Hot neurons (most frequent first), then the others: in ``coactivation`` order when the profile recorded
    one (neurons that fire together side by side, so that their reads merge), else most frequent first."""
    hot_set = set(int(i) for i in hot)
    hot_sorted = sorted(hot_set, key=lambda i: (-frequency[i], i))
    if coactivation:
        if sorted(int(i) for i in coactivation) != list(range(len(frequency))):
            raise XpucError("the profile's co-activation order is not a permutation of the unit's neurons")
        rest = coactivation
    else:
        rest = np.argsort(-frequency, kind="stable")
    return hot_sorted + [int(i) for i in rest if int(i) not in hot_set]


def _part_ranges(parts: list[int]) -> list[tuple[int, int]]:
    """Byte ranges of a record's parts."""
    edges = np.concatenate([[0], np.cumsum(parts)]).astype(int)
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:], strict=True)]


def write_flash_layout(spec, hot_neurons: list[list[int]], frequency: list[list[float]], cluster: int, dtype: str,
                       out_dir: str | os.PathLike, progress=None,
                       coactivation: list[list[int]] | None = None, split: bool = False) -> FlashLayout:
    """Write ``ffn.bin`` + ``ffn.crc32.npy`` + ``flash.json`` into ``out_dir`` (a staging directory).

    One region per FFN unit (a layer's FFN, or one expert of an MoE layer), in unit order; cold neurons in the
    profile's co-activation order when given (:func:`storage_order`); ``split``: gate rows, then up/down rows
    (clusters of one neuron of a gated kind only)."""
    c = spec.config
    out_dir = Path(out_dir)
    layout = BundleLayout(c.ffn_kind, c.hidden_size, c.intermediate_size, cluster, dtype)
    if split and (cluster != 1 or not layout.gated):
        raise XpucError(f"split records need clusters of one neuron of a gated FFN (got clusters of {cluster}, "
                        f"FFN kind '{layout.kind}')")
    cbytes = layout.record_bytes() * cluster
    row = cbytes // layout.rows
    parts = [row, cbytes - row] if split else []
    regions: list[LayerRegion] = []
    crcs = np.zeros((c.ffn_units, layout.n_clusters, max(len(parts), 1)), np.uint32)
    offset = 0
    with open(out_dir / "ffn.bin", "wb") as f:
        for i in range(c.ffn_units):
            p = c.ffn_prefix(i)
            order = storage_order(hot_neurons[i], np.asarray(frequency[i]), coactivation[i] if coactivation else None)
            idx = np.asarray(order)
            w = bundle_ffn(layout, spec.weights[p + "up_proj"][idx], spec.weights[p + "down_proj"][:, idx],
                           spec.weights[p + "gate_proj"][idx])
            raw = w.reshape(layout.n_clusters, -1).view(np.uint8)
            regions.append(LayerRegion(offset, len(hot_neurons[i]) // cluster, order))
            for p, (a, b) in enumerate(_part_ranges(parts or [cbytes])):
                chunk = np.ascontiguousarray(raw[:, a:b])
                crcs[i, :, p] = [zlib.crc32(r) for r in chunk]
                f.seek(offset)
                f.write(chunk.tobytes())
                offset = -(-(offset + chunk.nbytes) // ALIGN) * ALIGN
            if progress:
                progress(i + 1, c.ffn_units)
        f.truncate(offset)
        f.flush()
        os.fsync(f.fileno())
    np.save(out_dir / "ffn.crc32.npy", crcs if split else crcs[..., 0])
    fl = FlashLayout(c.ffn_kind, c.hidden_size, c.intermediate_size, cluster, dtype, cbytes, regions, offset,
                     parts=parts)
    fl.save(out_dir / "flash.json")
    return fl
