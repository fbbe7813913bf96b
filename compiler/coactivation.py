"""A storage order of one FFN unit's neurons that puts neurons which fire together next to each other.

Reads of neighbouring records merge into one request (``FlashReader``), so an order in which a token's active
neurons form long runs means fewer, larger reads — further up the storage's curve. The order comes from the
firing masks recorded on calibration text: recursive spectral bisection (spectral seriation) of the neurons'
co-firing graph, whose edge weights are the cosine similarities of the neurons' firing vectors over the
tokens. Each split sorts a group of neurons by the graph's Fiedler vector (the second eigenvector of the
normalized adjacency, by power iteration on ``A^T A`` without forming it) and halves it, down to ``leaf``
neurons; neurons that never fired go last.
"""

from __future__ import annotations

import numpy as np

ITERATIONS = 40


def _fiedler(a: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Second eigenvector of ``D^-1/2 S D^-1/2`` with ``S = a^T a`` (``a``: tokens x neurons, unit columns)."""
    d = a.T @ (a @ np.ones(a.shape[1]))  # degrees
    d = np.maximum(d, 1e-12)
    isd = 1.0 / np.sqrt(d)
    top = np.sqrt(d) / np.linalg.norm(np.sqrt(d))  # the first eigenvector, removed at every step
    v = rng.standard_normal(a.shape[1])
    for _ in range(ITERATIONS):
        v -= (v @ top) * top
        v = isd * (a.T @ (a @ (isd * v)))
        n = np.linalg.norm(v)
        if n == 0:
            break
        v /= n
    v -= (v @ top) * top
    return v


def coactivation_order(mask: np.ndarray, leaf: int = 32, seed: int = 0) -> list[int]:
    """Neuron ids of one unit in co-activation order.

    Parameters
    ----------
    mask:
        ``(tokens, neurons)`` booleans: which neurons fired for each calibration token.
    leaf:
        Groups of at most this many neurons are not split further (ordered by their Fiedler values).
    seed:
        Start vectors of the power iterations.
    """
    mask = np.asarray(mask, bool)
    counts = mask.sum(axis=0)
    fired = np.flatnonzero(counts > 0)
    a = mask[:, fired].astype(np.float32) / np.sqrt(counts[fired]).astype(np.float32)  # unit columns
    rng = np.random.default_rng(seed)
    out: list[int] = []
    stack = [np.arange(fired.size)]
    while stack:
        group = stack.pop()
        if group.size <= 1:
            out.extend(fired[group].tolist())
            continue
        f = _fiedler(a[:, group].astype(np.float64), rng)
        group = group[np.argsort(f, kind="stable")]
        if group.size <= leaf:
            out.extend(fired[group].tolist())
            continue
        half = group.size // 2
        stack.append(group[half:])  # popped after the first half: the order is depth first, left to right
        stack.append(group[:half])
    return out + np.flatnonzero(counts == 0).tolist()


def runs_per_token(mask: np.ndarray, order: list[int] | np.ndarray) -> tuple[float, float]:
    """(mean runs of consecutive active neurons per token, mean neurons per run) when stored in ``order``: the
    requests per token and their size in records, if every active neuron were read."""
    m = np.asarray(mask, bool)[:, np.asarray(order)]
    starts = m & ~np.concatenate([np.zeros((m.shape[0], 1), bool), m[:, :-1]], axis=1)
    runs = starts.sum(axis=1)
    active = m.sum(axis=1)
    return float(runs.mean()), float(active.sum() / max(runs.sum(), 1))
