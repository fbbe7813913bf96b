"""Activation statistics of a model's FFNs: what makes its neurons' firing predictable, and how it is spread.

Measured per FFN unit on a token stream, through the numpy reference (:func:`xpuc.compiler.profiler.ffn_activations`):

* ``gate_top_energy``: share of the gate matrix's squared Frobenius norm in its top 10 % singular values (a random
  Gaussian matrix: close to the 10 % of a flat spectrum; a trained one: more).
* ``input_top_energy``: share of the FFN inputs' variance in their top 10 % principal directions (anisotropy of
  the hidden states), and ``input_mean_share``: share of the inputs' mean square that is their mean.
* ``preact_rank_energy``: share of the gate pre-activations' variance over the tokens in their top ``rank``
  principal components -- what a rank-``rank`` linear predictor of the gate can capture at best.
* ``hot_share``: share of all firings taken by the 10 % most frequent neurons; ``dead_share``: neurons that never
  fire on the sample; ``sparsity``: share of (token, neuron) pairs that do not fire.
* ``overlap``: Jaccard overlap of consecutive tokens' active sets.
* ``recall`` / ``precision``: of a rank-``rank`` predictor (:func:`xpuc.compiler.predictor.train_predictor`) trained
  on the first part of the stream and measured on the rest.

SwiGLU units fire by a threshold on ``|silu(gate x)|`` chosen per unit for ``sparsity`` (CATS/TEAL-style), the ReLU
kinds where the activation is non-zero. :func:`compare_table` prints models side by side.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from xpuc.compiler.predictor import evaluate_predictor, train_predictor
from xpuc.compiler.profiler import ffn_activations, firing_mask
from xpuc.compiler.reference import silu
from xpuc.compiler.spec import ModelSpec
from xpuc.runtime.errors import XpucError

TOP_SHARE = 0.10
FIELDS = ("gate_top_energy", "input_top_energy", "input_mean_share", "preact_rank_energy", "sparsity", "hot_share",
          "dead_share", "overlap", "recall", "precision")


@dataclass
class ActivationStats:
    """Per-unit statistics (lists over FFN units) of one model on one token stream."""

    model: str
    tokens: int
    rank: int
    gate_top_energy: list[float]
    input_top_energy: list[float]
    input_mean_share: list[float]
    preact_rank_energy: list[float]
    sparsity: list[float]
    hot_share: list[float]
    dead_share: list[float]
    overlap: list[float]
    recall: list[float]
    precision: list[float]

    def means(self) -> dict[str, float]:
        return {k: float(np.mean(getattr(self, k))) for k in FIELDS}

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def top_energy(singular_values: np.ndarray, share: float = TOP_SHARE) -> float:
    """Share of ``sum(s**2)`` in the largest ``share`` of the singular values (at least one)."""
    s2 = np.sort(np.asarray(singular_values, np.float64) ** 2)[::-1]
    k = max(1, int(round(share * s2.size)))
    return float(s2[:k].sum() / max(s2.sum(), 1e-30))


def variance_in_top(a: np.ndarray, k: int) -> float:
    """Share of the variance of the rows of ``a`` (n, m) in its top ``k`` principal components."""
    c = np.asarray(a, np.float64) - a.mean(0, keepdims=True)
    ev = np.linalg.eigvalsh(c.T @ c if c.shape[1] <= c.shape[0] else c @ c.T)[::-1]
    ev = np.clip(ev, 0.0, None)
    return float(ev[:k].sum() / max(ev.sum(), 1e-30))


def gate_singular_values(gate: np.ndarray) -> np.ndarray:
    """Singular values of a (F, d) gate matrix, from the eigenvalues of its smaller Gram matrix."""
    g = np.asarray(gate, np.float32)
    gram = g.T @ g if g.shape[1] <= g.shape[0] else g @ g.T
    return np.sqrt(np.clip(np.linalg.eigvalsh(gram.astype(np.float64)), 0.0, None))[::-1]


def consecutive_overlap(mask: np.ndarray) -> float:
    """Mean Jaccard overlap of consecutive rows of a (n, F) bool firing mask."""
    if mask.shape[0] < 2:
        return 1.0
    inter = (mask[1:] & mask[:-1]).sum(1)
    union = (mask[1:] | mask[:-1]).sum(1)
    return float(np.mean(np.where(union > 0, inter / np.maximum(union, 1), 1.0)))


def frequency_shares(mask: np.ndarray, share: float = TOP_SHARE) -> tuple[float, float]:
    """(share of firings by the ``share`` most frequent neurons, share of neurons that never fire)."""
    freq = np.sort(mask.mean(0))[::-1]
    k = max(1, int(round(share * freq.size)))
    return float(freq[:k].sum() / max(freq.sum(), 1e-30)), float((freq == 0).mean())


def _collect(spec: ModelSpec, token_ids: list[int], window: int) -> list[tuple | None]:
    """Per FFN unit ``(x, g, u)`` over ``token_ids`` (None for an MoE expert no token was routed to)."""
    got: list[list[tuple]] = [[] for _ in range(spec.config.ffn_units)]
    for i, x, g, u in ffn_activations(spec, token_ids, window):
        got[i].append((x.astype(np.float32), g.astype(np.float32), u.astype(np.float32)))
    return [tuple(np.concatenate(a) for a in zip(*v, strict=True)) if v else None for v in got]


def measure_activations(spec: ModelSpec, token_ids: list[int], sparsity: float | None = None, rank: int = 64,
                        train_share: float = 0.75, name: str = "", window: int = 256,
                        progress=None) -> ActivationStats:
    """Measure :class:`ActivationStats` on ``token_ids`` (the first ``train_share`` trains the predictor and sets
    SwiGLU thresholds, the rest is held out for the predictor's recall/precision and the firing statistics)."""
    c = spec.config
    if c.ffn_kind == "swiglu" and sparsity is None:
        raise XpucError("a SwiGLU model needs a target sparsity to define which neurons fire")
    if len(token_ids) < 64:
        raise XpucError(f"{len(token_ids)} tokens are too few to measure activation statistics (at least 64)")
    n_train = int(len(token_ids) * train_share)
    parts = [_collect(spec, list(part), window) for part in (token_ids[:n_train], token_ids[n_train:])]
    out: dict[str, list[float]] = {k: [] for k in FIELDS}
    pairs_train, pairs_held = [], []
    for i in range(c.ffn_units):
        if parts[0][i] is None or parts[1][i] is None:
            raise XpucError(f"FFN unit {i} saw no tokens in one part of the stream; give more tokens")
        (x_tr, g_tr, u_tr), (x_he, g_he, u_he) = parts[0][i], parts[1][i]
        thr = float(np.quantile(np.abs(silu(g_tr)), sparsity)) if c.ffn_kind == "swiglu" else 0.0
        m_tr, m_he = firing_mask(c.ffn_kind, g_tr, u_tr, thr), firing_mask(c.ffn_kind, g_he, u_he, thr)
        pairs_train.append((x_tr, m_tr))
        pairs_held.append((x_he, m_he))
        gate = spec.weights[c.ffn_prefix(i) + "gate_proj"]
        out["gate_top_energy"].append(top_energy(gate_singular_values(gate)))
        x_all = np.concatenate([x_tr, x_he]).astype(np.float64)
        out["input_top_energy"].append(variance_in_top(x_all, max(1, int(round(TOP_SHARE * x_all.shape[1])))))
        out["input_mean_share"].append(float((x_all.mean(0) ** 2).sum() / max((x_all ** 2).sum(1).mean(), 1e-30)))
        out["preact_rank_energy"].append(variance_in_top(np.concatenate([g_tr, g_he]), rank))
        out["sparsity"].append(float(1.0 - m_he.mean()))
        hot, dead = frequency_shares(m_he)
        out["hot_share"].append(hot)
        out["dead_share"].append(dead)
        out["overlap"].append(consecutive_overlap(m_he))
        if progress:
            progress(i + 1, c.ffn_units)
    pred = train_predictor(spec, pairs_train, recall=0.97, ranks=(rank,))
    rep = evaluate_predictor(pred, pairs_held)
    out["recall"], out["precision"] = rep.recall, rep.precision
    return ActivationStats(name or spec.source, len(token_ids), rank, **out)


def compare_table(stats: list[ActivationStats]) -> str:
    """A markdown table: one row per statistic (mean over units, with the range), one column per model."""
    head = "| statistic | " + " | ".join(s.model for s in stats) + " |"
    rows = [head, "|---|" + "---|" * len(stats)]
    for k in FIELDS:
        cells = []
        for s in stats:
            v = np.asarray(getattr(s, k))
            cells.append(f"{v.mean():.3f} ({v.min():.2f}–{v.max():.2f})")
        rows.append(f"| {k} | " + " | ".join(cells) + " |")
    return "\n".join(rows)
