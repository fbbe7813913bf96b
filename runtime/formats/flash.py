"""FlashLayout: where each FFN unit's neuron-cluster records lie in the flash file (``flash.json``, versioned).

A record is stored whole (``parts`` empty: ``[C, R, row]`` at ``offset + j * cluster_bytes``) or *split*
(PowerInfer-2's int4 layout, clusters of one neuron): each unit's region holds the gate rows of all its neurons,
then, from the next 4 KiB boundary, their up/down rows (``parts = [gate bytes, up/down bytes]``). A split record
is read in two steps: the gate row of every predicted neuron, then the up/down rows of the ones whose gate fired.
Each part has its own CRC-32 (``ffn.crc32.npy`` of shape ``(units, clusters, parts)``).
"""

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
    parts: list[int] = field(default_factory=list)  # bytes of each part of a split record; empty: stored whole

    def __post_init__(self) -> None:
        if self.parts and (sum(self.parts) != self.cluster_bytes or min(self.parts) <= 0 or self.cluster != 1):
            raise ValueError(f"record parts {self.parts} do not split records of {self.cluster_bytes} bytes "
                             f"(clusters of {self.cluster}; only clusters of one neuron are split)")

    @property
    def split(self) -> bool:
        """Records are stored as a gate part and an up/down part (read separately)."""
        return bool(self.parts)

    @property
    def part_bytes(self) -> list[int]:
        return list(self.parts) or [self.cluster_bytes]

    @property
    def part_skip(self) -> list[int]:
        """Byte offset of each part within a record in memory (``[C, R, row]``)."""
        return [sum(self.part_bytes[:p]) for p in range(len(self.part_bytes))]

    def part_base(self, layer: int, part: int) -> int:
        """File offset of part ``part`` of the unit's first cluster (parts' regions start on 4 KiB boundaries)."""
        at = self.layers[layer].offset
        for q in range(part):
            at = -(-(at + self.n_clusters * self.part_bytes[q]) // ALIGN) * ALIGN
        return at

    def unit_bytes(self) -> int:
        """Bytes of one unit's region (its parts, each from a 4 KiB boundary; the last one not padded)."""
        last = len(self.part_bytes) - 1
        if not self.layers:
            return 0
        return self.part_base(0, last) - self.layers[0].offset + self.n_clusters * self.part_bytes[last]

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
        """File offset of cluster ``j``'s whole record (records stored whole only)."""
        if self.split:
            raise ValueError("records are split; use part_base")
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
