"""Flash layout writer: a model's FFN weights as bundled neuron-cluster records in one file.

Per layer, neurons are stored in the order *hot first* (the plan's hot neurons, most frequent first), then
cold (most frequent first, so neurons often read together lie side by side and their reads merge). Every
``C`` consecutive neurons form a cluster record ``[C, R, row]`` in the bundled format of
:mod:`xpuc.schedules.neuron_bundle` (gate | up | down column per neuron, fp16 or GGML q4_0/q4_1 blocks).
Layer regions start on 4 KiB boundaries and the file ends on one, so a layer can be streamed with
``O_DIRECT``; single records are read as the 4 KiB-aligned span that covers them (records of neighbouring
neurons share pages, and their reads merge). Every cluster
record has a CRC-32 (``ffn.crc32.npy``), checked after each read; the layout description (``flash.json``,
versioned) holds each layer's neuron order and offsets.

Left out: the int4 split into a gate record and an up/down record (reading up/down only when the gate
fires). With clusters of 16-32 neurons a cluster's gate almost always has one firing neuron, so the split
saves little at cluster granularity; the fused record keeps one read per cluster.
"""

from __future__ import annotations

import dataclasses
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from xpuc.compiler.errors import XpucError
from xpuc.compiler.jsonfile import read_versioned, write_json_atomic
from xpuc.schedules.neuron_bundle import BundleLayout, bundle_ffn

FLASH_SCHEMA = 1
ALIGN = 4096


@dataclass
class LayerRegion:
    offset: int  # byte offset of the layer's first cluster record
    hot_clusters: int  # clusters [0, hot_clusters) hold the plan's hot neurons
    order: list[int]  # neuron ids in storage order (a permutation of range(d_ff))


@dataclass
class FlashLayout:
    kind: str
    d_model: int
    d_ff: int
    cluster: int
    dtype: str
    cluster_bytes: int
    layers: list[LayerRegion]
    file_bytes: int = 0
    ffn_file: str = "ffn.bin"
    crc_file: str = "ffn.crc32.npy"
    schema: int = FLASH_SCHEMA
    extra: dict = field(default_factory=dict)

    @property
    def n_clusters(self) -> int:
        return self.d_ff // self.cluster

    @property
    def aligned(self) -> bool:
        """Cluster records are whole 4 KiB blocks (O_DIRECT reads straight into cache slots)."""
        return self.cluster_bytes % ALIGN == 0

    def bundle_layout(self, n_clusters: int) -> BundleLayout:
        """Layout of an array of ``n_clusters`` cluster records (a cache segment, or the whole layer)."""
        return BundleLayout(self.kind, self.d_model, n_clusters * self.cluster, self.cluster, self.dtype)

    def cluster_offset(self, layer: int, j: int) -> int:
        return self.layers[layer].offset + j * self.cluster_bytes

    def cluster_of_neuron(self, layer: int) -> np.ndarray:
        """(d_ff,) int32: the cluster holding each neuron id."""
        pos = np.empty(self.d_ff, np.int32)
        pos[np.asarray(self.layers[layer].order)] = np.arange(self.d_ff, dtype=np.int32)
        return pos // self.cluster

    def save(self, path: str | os.PathLike) -> Path:
        return write_json_atomic(path, dataclasses.asdict(self))

    @classmethod
    def load(cls, path: str | os.PathLike) -> FlashLayout:
        d = read_versioned(path, FLASH_SCHEMA, "flash layout")
        try:
            d["layers"] = [LayerRegion(**r) for r in d["layers"]]
            return cls(**d)
        except TypeError:
            raise XpucError(f"{path}: not a readable xpuc flash layout (unexpected fields)") from None


def storage_order(hot: list[int], frequency: np.ndarray) -> list[int]:
    """Hot neurons (most frequent first), then the others (most frequent first)."""
    hot_set = set(int(i) for i in hot)
    hot_sorted = sorted(hot_set, key=lambda i: (-frequency[i], i))
    cold = [int(i) for i in np.argsort(-frequency, kind="stable") if int(i) not in hot_set]
    return hot_sorted + cold


def write_flash_layout(spec, hot_neurons: list[list[int]], frequency: list[list[float]], cluster: int, dtype: str,
                       out_dir: str | os.PathLike, progress=None) -> FlashLayout:
    """Write ``ffn.bin`` + ``ffn.crc32.npy`` + ``flash.json`` into ``out_dir`` (a staging directory).

    One region per FFN unit (a layer's FFN, or one expert of an MoE layer), in unit order."""
    c = spec.config
    out_dir = Path(out_dir)
    layout = BundleLayout(c.ffn_kind, c.hidden_size, c.intermediate_size, cluster, dtype)
    cbytes = layout.record_bytes() * cluster
    regions: list[LayerRegion] = []
    crcs = np.zeros((c.ffn_units, layout.n_clusters), np.uint32)
    offset = 0
    with open(out_dir / "ffn.bin", "wb") as f:
        for i in range(c.ffn_units):
            p = c.ffn_prefix(i)
            order = storage_order(hot_neurons[i], np.asarray(frequency[i]))
            idx = np.asarray(order)
            w = bundle_ffn(layout, spec.weights[p + "up_proj"][idx], spec.weights[p + "down_proj"][:, idx],
                           spec.weights[p + "gate_proj"][idx])
            raw = w.reshape(layout.n_clusters, -1).view(np.uint8)
            crcs[i] = [zlib.crc32(r) for r in raw]
            f.seek(offset)
            f.write(raw.tobytes())
            regions.append(LayerRegion(offset, len(hot_neurons[i]) // cluster, order))
            offset = -(-(offset + raw.nbytes) // ALIGN) * ALIGN
            if progress:
                progress(i + 1, c.ffn_units)
        f.truncate(offset)
        f.flush()
        os.fsync(f.fileno())
    np.save(out_dir / "ffn.crc32.npy", crcs)
    fl = FlashLayout(c.ffn_kind, c.hidden_size, c.intermediate_size, cluster, dtype, cbytes, regions, offset)
    fl.save(out_dir / "flash.json")
    return fl
