"""Segmented neuron cache: one pool of cluster slots shared by all layers (one compiled kernel indexes it).

Each layer owns a contiguous range of the pool:

* **hot segment** — slots ``[start, start + n_hot)`` hold the layer's hot clusters (storage clusters
  ``0 .. n_hot-1``, loaded once at start and never evicted);
* **cold segment** — ``n_cold`` slots managed per layer, by recency (``lru``) or, for the LLM-in-a-flash
  baseline, by a sliding window over the last tokens (``window``, as the paper's windowing: after each token
  the clusters not used in the last ``W`` tokens are dropped, so the memory holds only the window's
  neurons; within the window, the least recently used go first when the segment is full).

A slot of a split record (:mod:`xpuc.runtime.formats.flash`) can hold its gate row alone: ``complete`` says
which slots also hold their up/down rows (hot slots always do). Evicted weights are simply overwritten. The
pool is the only FFN memory the runtime holds, so the bytes it accounts (``nbytes``) are exact. Recency is
kept in arrays (a use stamp and the token of the last use per cluster), so lookups, evictions and fills are
numpy operations over a token's thousands of clusters, not
Python loops.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from xpuc.runtime.flash_reader import aligned_empty


@dataclass
class LayerSegment:
    start: int
    n_hot: int
    n_cold: int
    slot_of: np.ndarray  # (n_clusters,) int32, -1 = not resident; global slot ids
    stamp: np.ndarray  # (n_clusters,) int64: order of the last use of a resident cold cluster (-1: none)
    used: np.ndarray  # (n_clusters,) int64: token of that last use
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
        self.complete = np.zeros(max(total, 1), bool)  # slot holds its whole record (not the gate part alone)
        start = 0
        for h, c in zip(hot, cold, strict=False):
            slot_of = np.full(n_clusters, -1, np.int32)
            slot_of[:h] = np.arange(start, start + h, dtype=np.int32)
            self.owner[start:start + h] = np.arange(h)
            self.complete[start:start + h] = True
            self.layers.append(LayerSegment(start, int(h), int(c), slot_of, np.full(n_clusters, -1, np.int64),
                                            np.full(n_clusters, -1, np.int64)))
            start += h + c
        self.token = 0
        self._clock = 0  # use stamps: later uses, and later positions within one call, get larger ones

    @property
    def nbytes(self) -> int:
        return int(self.pool.nbytes)

    def hot_slots(self, layer: int) -> np.ndarray:
        seg = self.layers[layer]
        return np.arange(seg.start, seg.start + seg.n_hot, dtype=np.int32)

    def lookup(self, layer: int, clusters: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Split needed clusters into resident slots (sorted) and missing clusters; marks hits as used now."""
        seg = self.layers[layer]
        if clusters.size and clusters.max() < seg.n_hot:  # all hot: their slots follow the storage order
            seg.hits += clusters.size
            return np.sort(clusters) + np.int32(seg.start), clusters[:0]
        slots = seg.slot_of[clusters]
        hit = slots >= 0
        self._touch(seg, clusters[hit & (clusters >= seg.n_hot)])
        seg.hits += int(hit.sum())
        seg.misses += int((~hit).sum())
        return np.sort(slots[hit]), clusters[~hit]

    def _touch(self, seg: LayerSegment, clusters: np.ndarray) -> None:
        seg.stamp[clusters] = self._clock + np.arange(len(clusters))
        seg.used[clusters] = self.token
        self._clock += len(clusters)

    def victims(self, layer: int, n: int, keep: np.ndarray) -> list[int]:
        """Up to ``n`` cold slots to (re)fill: empty ones first, then the least recently used (``window``: all
        resident clusters are in the window, see :meth:`next_token`); ``keep``: clusters in use this token, never
        evicted."""
        seg = self.layers[layer]
        cold = self.owner[seg.cold_start:seg.cold_start + seg.n_cold]
        free = np.flatnonzero(cold < 0)[:n] + seg.cold_start
        if len(free) >= n:
            return free.tolist()
        occupied = np.flatnonzero(cold >= 0)
        owners = cold[occupied]
        keep = np.asarray(keep, np.int64)
        if keep.size:
            in_use = np.zeros(self.n_clusters, bool)
            in_use[keep] = True
            occupied, owners = occupied[~in_use[owners]], owners[~in_use[owners]]
        oldest = occupied[np.argsort(seg.stamp[owners], kind="stable")[: n - len(free)]] + seg.cold_start
        return free.tolist() + oldest.tolist()

    def assign(self, layer: int, clusters: np.ndarray, slots: np.ndarray, complete: bool = True) -> None:
        """Record that ``slots[k]`` now holds ``clusters[k]`` (their previous owners are dropped); ``complete``:
        whole records (else their gate parts only)."""
        seg = self.layers[layer]
        clusters, slots = np.asarray(clusters, np.int64), np.asarray(slots, np.int64)
        prev = self.owner[slots]
        prev = prev[prev >= 0]
        seg.slot_of[prev] = -1
        seg.stamp[prev] = -1
        self.owner[slots] = clusters
        self.complete[slots] = complete
        seg.slot_of[clusters] = slots
        self._touch(seg, clusters)

    def next_token(self) -> None:
        self.token += 1
        if self.policy == "window":
            for seg in self.layers:
                self._drop_outside_window(seg)

    def _drop_outside_window(self, seg: LayerSegment) -> None:
        lo, hi = seg.cold_start, seg.cold_start + seg.n_cold
        owners = self.owner[lo:hi]
        held = np.flatnonzero(owners >= 0)
        old = held[self.token - seg.used[owners[held]] >= self.window]
        if old.size:
            gone = owners[old]
            seg.slot_of[gone] = -1
            seg.stamp[gone] = -1
            self.owner[lo + old] = -1
            self.complete[lo + old] = False

    def hit_rate(self) -> float:
        h = sum(s.hits for s in self.layers)
        m = sum(s.misses for s in self.layers)
        return h / max(h + m, 1)

    def reset_counters(self) -> None:
        for s in self.layers:
            s.hits = s.misses = 0
