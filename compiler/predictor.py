"""Activation predictor: per layer a low-rank MLP ``d_model -> r -> d_ff`` (ReLU) that guesses which FFN
neurons fire for a token, trained offline in numpy on the profiler's (FFN input, firing mask) pairs.

Training
--------
* **Initialisation from the gate, on the data.** The gate pre-activations of the calibration tokens,
  ``G = X W_gᵀ`` (n, F), are what the predictor must rank. Their best rank-``k`` approximation is
  ``G V_k V_kᵀ`` (``V_k``: the leading right singular vectors of ``G``), i.e. the linear predictor
  ``B A x`` with ``A = V_kᵀ W_g`` and ``B = V_k`` (reduced-rank regression). It beats the SVD of ``W_g`` itself
  whenever the hidden states are anisotropic, as a real model's are: only the directions that the data
  excites count. A ReLU layer carries it exactly: ``relu(z) - relu(-z) = z``, so hidden units
  ``[A x, -A x]`` with output weights ``[B, -B]`` reproduce ``B A x``; ``r = 2k``.
* **Fine-tuning.** Adam on the class-weighted binary cross-entropy (firing neurons weighted by the
  inverse of their rate, so recall is not sacrificed to the many silent neurons), mini-batches of 256.
* **Threshold per layer.** On a validation split of the calibration tokens, the logit threshold is the
  ``1 - recall`` quantile of the logits of neurons that fired: the predictor then keeps ``recall`` of the
  firing neurons. Ranks from ``ranks`` are tried and the one predicting the fewest active neurons at that
  recall, on average over the units, is kept for all of them (the smaller rank on ties within one
  percentage point): the decode module compiles one predict function.

Reported on held-out text (:func:`evaluate_predictor`): recall, precision and predicted sparsity.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from xpuc.compiler.profiler import ffn_activations, firing_mask
from xpuc.compiler.spec import ModelSpec
from xpuc.runtime.errors import XpucError
from xpuc.runtime.formats.predictor import LayerPredictor, Predictor

MIN_UNIT_TOKENS = 16  # calibration rows an FFN unit needs for its predictor (train + validation split)


def collect_pairs(spec: ModelSpec, token_ids: list[int], thresholds: list[float], window: int = 256
                  ) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per FFN unit ``(X, M)``: its inputs (n, d) float32 and firing masks (n, F) bool (an MoE expert: the
    tokens routed to it)."""

    c = spec.config
    xs: list[list[np.ndarray]] = [[] for _ in range(c.ffn_units)]
    ms: list[list[np.ndarray]] = [[] for _ in range(c.ffn_units)]
    for i, x, g, u in ffn_activations(spec, token_ids, window):
        xs[i].append(x.astype(np.float32))
        ms[i].append(firing_mask(c.ffn_kind, g, u, thresholds[i]))
    few = [i for i, x in enumerate(xs) if sum(len(a) for a in x) < MIN_UNIT_TOKENS]
    if few:
        u = few[0]
        what = (f"expert {u % c.num_experts} of layer {c.unit_layer(u)}" if c.is_moe else f"layer {u}")
        raise XpucError(f"{what} saw {sum(len(a) for a in xs[u])} calibration tokens (< {MIN_UNIT_TOKENS}): "
                        "give more --text to train its predictor")
    return [(np.concatenate(x), np.concatenate(m)) for x, m in zip(xs, ms, strict=False)]


def _top_svd(a: np.ndarray, k: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Leading ``k`` singular triplets by a randomized range finder with two power iterations."""
    rng = np.random.default_rng(seed)
    a = a.astype(np.float32)
    q, _ = np.linalg.qr(a @ rng.standard_normal((a.shape[1], min(k + 16, min(a.shape)))).astype(np.float32))
    for _ in range(2):
        q, _ = np.linalg.qr(a @ (a.T @ q))
    ub, s, vt = np.linalg.svd((q.T @ a).astype(np.float64), full_matrices=False)
    return (q @ ub)[:, :k], s[:k], vt[:k]


def _init_from_gate(gate: np.ndarray, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """First-layer (2k, d) and output (F, 2k) weights whose product is the rank-``k`` reduced-rank
    regression of the gate pre-activations ``x @ gate.T`` on ``x`` (see the module docstring).

    Each hidden unit is scaled to unit standard deviation over ``x``, so that Adam's steps have the same
    meaning for every unit. With fewer than ``2k`` rows in ``x`` (an MoE expert that few calibration tokens
    were routed to) the data cannot fix ``k`` directions: the gate's own rank-``k`` SVD is used instead.
    """
    if x.shape[0] < 2 * k:
        u, s, vt = _top_svd(gate, k)
        a = (np.sqrt(s)[:, None] * vt).astype(np.float32)  # (k, d)
        b = (u * np.sqrt(s)[None]).astype(np.float32)  # (F, k)
        return np.concatenate([a, -a]), np.concatenate([b, -b], axis=1)
    g = x.astype(np.float32) @ gate.T.astype(np.float32)  # (n, F)
    _, s, vt = _top_svd(g, k)
    std = s / np.sqrt(x.shape[0])
    std = np.maximum(std, 1e-3 * std[0] + 1e-12).astype(np.float32)  # a direction the data never excites
    a = ((vt @ gate.astype(np.float64)) / std[:, None]).astype(np.float32)  # (k, d)
    b = (vt.T * std[None]).astype(np.float32)  # (F, k)
    return np.concatenate([a, -a]), np.concatenate([b, -b], axis=1)


def train_layer(x: np.ndarray, m: np.ndarray, gate: np.ndarray, rank: int, recall: float, epochs: int = 6,
                seed: int = 0, lr: float = 3e-3) -> tuple[LayerPredictor, float]:
    """Train one layer's predictor; returns it and its predicted density on the validation split."""
    rng = np.random.default_rng(seed)
    n = x.shape[0]
    order = rng.permutation(n)
    n_val = max(1, n // 6)
    val, tr = order[:n_val], order[n_val:]
    w1, w2 = _init_from_gate(gate, x[tr], max(1, rank // 2))
    b1 = np.zeros(w1.shape[0], np.float32)
    # scale the output so that the initial logits sit in a useful range, bias from the firing rate
    z = np.maximum(x[tr[:512]] @ w1.T, 0) @ w2.T
    scale = 4.0 / (z.std() + 1e-6)
    w2 *= scale
    rate = np.clip(m[tr].mean(0), 1e-3, 1 - 1e-3)
    b2 = (np.log(rate / (1 - rate)) - (z * scale).mean(0)).astype(np.float32)
    pos_w = np.clip((1 - rate) / rate, 1.0, 50.0).astype(np.float32)
    params = [w1, b1, w2, b2]
    mom = [np.zeros_like(p) for p in params]
    vel = [np.zeros_like(p) for p in params]
    step = 0
    for _ in range(epochs):
        for _s in range(0, len(tr), 256):
            bi = tr[rng.permutation(len(tr))[:256]] if len(tr) > 256 else tr
            xb, mb = x[bi], m[bi].astype(np.float32)
            hpre = xb @ w1.T + b1
            h = np.maximum(hpre, 0)
            logit = h @ w2.T + b2
            p = 1.0 / (1.0 + np.exp(-np.clip(logit, -30, 30)))
            wgt = np.where(mb > 0, pos_w, 1.0)
            dl = (p - mb) * wgt / len(bi)
            grads = [None, None, dl.T @ h, dl.sum(0)]
            dh = (dl @ w2) * (hpre > 0)
            grads[0], grads[1] = dh.T @ xb, dh.sum(0)
            step += 1
            for j, (prm, gr) in enumerate(zip(params, grads, strict=False)):
                mom[j] = 0.9 * mom[j] + 0.1 * gr
                vel[j] = 0.999 * vel[j] + 0.001 * gr * gr
                prm -= lr * (mom[j] / (1 - 0.9**step)) / (np.sqrt(vel[j] / (1 - 0.999**step)) + 1e-8)
    lp = LayerPredictor(w1, b1, w2, b2, 0.0)
    lv, mv = lp.logits(x[val]), m[val]
    fired = lv[mv]
    lp.threshold = float(np.quantile(fired, 1.0 - recall)) if fired.size else float(lv.max() + 1)
    return lp, float((lv > lp.threshold).mean())


def train_predictor(spec: ModelSpec, pairs: list[tuple[np.ndarray, np.ndarray]], recall: float = 0.97,
                    ranks: tuple[int, ...] = (32, 96), epochs: int = 6, seed: int = 0,
                    progress=None) -> Predictor:
    """Train every unit's predictor at each of ``ranks`` and keep one rank for the whole model (the decode
    module compiles one predict function): the one predicting the fewest active neurons on the validation
    splits, on average over the units, at the requested recall (the smaller rank on ties within one
    percentage point)."""
    if not 0.5 <= recall < 1.0:
        raise XpucError("--recall must be in [0.5, 1)")
    ranks = tuple(sorted(set(ranks)))
    trained: dict[int, list[LayerPredictor]] = {r: [] for r in ranks}
    density: dict[int, list[float]] = {r: [] for r in ranks}
    for i, (x, m) in enumerate(pairs):
        gate = spec.weights[spec.config.ffn_prefix(i) + "gate_proj"]
        for r in ranks:
            lp, dens = train_layer(x, m, gate, r, recall, epochs, seed + i)
            trained[r].append(lp)
            density[r].append(dens)
        if progress:
            progress(i + 1, len(pairs))
    best = ranks[0]
    for r in ranks[1:]:
        if float(np.mean(density[r])) < float(np.mean(density[best])) - 0.01:
            best = r
    return Predictor(trained[best], spec.fingerprint(), recall)


@dataclass
class PredictorReport:
    recall: list[float]
    precision: list[float]
    predicted_sparsity: list[float]
    true_sparsity: list[float]
    ranks: list[int]

    def summary(self) -> str:
        def mean(v):
            return float(np.mean(v))

        return (f"predictor on held-out text: recall {mean(self.recall):.3f} (min {min(self.recall):.3f}), "
                f"precision {mean(self.precision):.3f}, predicted sparsity {mean(self.predicted_sparsity):.3f} "
                f"(true {mean(self.true_sparsity):.3f}), ranks {sorted(set(self.ranks))}")


def evaluate_predictor(pred: Predictor, pairs: list[tuple[np.ndarray, np.ndarray]]) -> PredictorReport:
    rec, prec, psp, tsp = [], [], [], []
    for lp, (x, m) in zip(pred.layers, pairs, strict=False):
        p = lp.predict(x)
        tp = float((p & m).sum())
        rec.append(tp / max(float(m.sum()), 1.0))
        prec.append(tp / max(float(p.sum()), 1.0))
        psp.append(1.0 - float(p.mean()))
        tsp.append(1.0 - float(m.mean()))
    return PredictorReport(rec, prec, psp, tsp, [lp.rank for lp in pred.layers])
