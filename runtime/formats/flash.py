"""FlashLayout: where each FFN unit's neuron-cluster records lie in the flash file (``flash.json``, versioned)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from xpuc.runtime.formats.bundle import BundleLayout
from xpuc.runtime.formats.jsonfile import JsonRecord

FLASH_SCHEMA = 1
ALIGN = 4096


@dataclass
class LayerRegion:
    offset: int  # byte offset of the layer's first cluster record
    hot_clusters: int  # clusters [0, hot_clusters) hold the plan's hot neurons
    order: list[int]  # neuron ids in storage order (a permutation of range(d_ff))


@dataclass
class FlashLayout(JsonRecord):
    """The FFN flash file's layout: record format, cluster size and each unit's region and neuron order."""

    SCHEMA, WHAT = FLASH_SCHEMA, "flash layout"

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

    @classmethod
    def _from_json(cls, d: dict) -> FlashLayout:
        d["layers"] = [LayerRegion(**r) for r in d["layers"]]
        return cls(**d)
