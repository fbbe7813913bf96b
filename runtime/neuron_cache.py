"""Segmented neuron cache: one pool of cluster slots shared by all layers (one compiled kernel indexes it).

Each layer owns a contiguous range of the pool:

* **hot segment** — slots ``[start, start + n_hot)`` hold the layer's hot clusters (storage clusters
  ``0 .. n_hot-1``, loaded once at start and never evicted);
* **cold segment** — ``n_cold`` slots managed per layer, by recency (``lru``) or, for the LLM-in-a-flash
  baseline, by a sliding window over the last tokens (``window``: clusters not used in the last ``W``
  tokens are evicted first).

Evicted weights are simply overwritten. The pool is the only FFN memory the runtime holds, so the bytes it
accounts (``nbytes``) are exact.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from xpuc.runtime.flash_reader import aligned_empty


@dataclass
class LayerSegment:
    start: int
    n_hot: int
    n_cold: int
    slot_of: np.ndarray  # (n_clusters,) int32, -1 = not resident; global slot ids
    recency: OrderedDict = field(default_factory=OrderedDict)  # cold cluster -> last token used
    hits: int = 0
    misses: int = 0

    @property
    def cold_start(self) -> int:
        return self.start + self.n_hot


class NeuronCache:
    """Slot pool plus per-layer residency maps.

    Parameters
    ----------
    record_shape, dtype:
        Shape (``[C, R, row]``) and storage dtype of one cluster record.
    n_clusters:
        Clusters per layer.
    hot, cold:
        Per-layer hot cluster counts and cold slot counts.
    policy:
        ``"lru"`` or ``"window"``.
    window:
        Tokens of the sliding window (``policy="window"``).
    """

    def __init__(self, record_shape: tuple[int, ...], dtype: str, n_clusters: int, hot: list[int], cold: list[int],
                 policy: str = "lru", window: int = 5) -> None:
        if policy not in ("lru", "window"):
            raise ValueError(policy)
        self.policy, self.window = policy, window
        self.n_clusters = n_clusters
        total = int(sum(hot) + sum(cold))
        self.pool = aligned_empty((max(total, 1), *record_shape), dtype)
        self.layers: list[LayerSegment] = []
        self.owner = np.full(max(total, 1), -1, np.int64)  # slot -> cluster it holds (-1: empty)
        start = 0
        for h, c in zip(hot, cold, strict=False):
            slot_of = np.full(n_clusters, -1, np.int32)
            slot_of[:h] = np.arange(start, start + h, dtype=np.int32)
            self.owner[start:start + h] = np.arange(h)
            self.layers.append(LayerSegment(start, int(h), int(c), slot_of))
            start += h + c
        self.token = 0

    @property
    def nbytes(self) -> int:
        return int(self.pool.nbytes)

    def hot_slots(self, layer: int) -> np.ndarray:
        seg = self.layers[layer]
        return np.arange(seg.start, seg.start + seg.n_hot, dtype=np.int32)

    def lookup(self, layer: int, clusters: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Split needed clusters into resident slots and missing clusters; marks hits as used now."""
        seg = self.layers[layer]
        slots = seg.slot_of[clusters]
        hit = slots >= 0
        for c in clusters[hit & (clusters >= seg.n_hot)]:
            seg.recency[int(c)] = self.token
            seg.recency.move_to_end(int(c))
        seg.hits += int(hit.sum())
        seg.misses += int((~hit).sum())
        return np.sort(slots[hit]), clusters[~hit]

    def victims(self, layer: int, n: int, keep: set[int]) -> list[int]:
        """Up to ``n`` cold slots to (re)fill, emptiest/oldest first; ``keep``: clusters in use this token."""
        seg = self.layers[layer]
        cold = self.owner[seg.cold_start:seg.cold_start + seg.n_cold]
        free = (np.flatnonzero(cold < 0) + seg.cold_start)[:n].tolist()
        order = [c for c in seg.recency if c not in keep]  # least recently used first
        if self.policy == "window":  # clusters used within the last W tokens go last
            order = ([c for c in order if self.token - seg.recency[c] >= self.window]
                     + [c for c in order if self.token - seg.recency[c] < self.window])
        out = free[:n] + [int(seg.slot_of[c]) for c in order[: max(0, n - len(free))]]
        return out

    def assign(self, layer: int, cluster: int, slot: int) -> None:
        """Record that ``slot`` now holds ``cluster`` (its previous owner is dropped)."""
        seg = self.layers[layer]
        prev = int(self.owner[slot])
        if prev >= 0:
            seg.slot_of[prev] = -1
            seg.recency.pop(prev, None)
        self.owner[slot] = cluster
        seg.slot_of[cluster] = slot
        seg.recency[int(cluster)] = self.token
        seg.recency.move_to_end(int(cluster))

    def next_token(self) -> None:
        self.token += 1

    def hit_rate(self) -> float:
        h = sum(s.hits for s in self.layers)
        m = sum(s.misses for s in self.layers)
        return h / max(h + m, 1)

    def reset_counters(self) -> None:
        for s in self.layers:
            s.hits = s.misses = 0
