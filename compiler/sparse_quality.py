"""Quality of a sparsified model: top-1 agreement with the dense model and perplexity, on held-out text.

The sparse model computes each FFN over the neurons that fire (``|silu(g)| > t_l`` for SwiGLU models made
sparse by thresholding, ``act != 0`` for the ReLU kinds) and, when a predictor is given, only over those the
predictor selected: a neuron the predictor misses is not computed, exactly as on the sparse decode path.
Evaluation is teacher-forced over windows of the text: at every position the sparse and the dense
model see the same prefix.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from xpuc.compiler.profiler import firing_mask
from xpuc.compiler.reference import ReferenceModel, silu
from xpuc.compiler.spec import ModelSpec


class SparseReference(ReferenceModel):
    """The numpy reference with thresholded (and optionally predicted) FFN sparsity."""

    def __init__(self, spec: ModelSpec, thresholds: list[float], predictor=None,
                 cluster_of: list[np.ndarray] | None = None, weight_dtype: str = "float16") -> None:
        super().__init__(spec, weight_dtype)
        self.thresholds = thresholds
        self.predictor = predictor
        self.cluster_of = cluster_of  # per FFN unit: cluster of each neuron (the decode path selects clusters)
        self.computed: list[float] = []  # share of neurons computed, per FFN call

    def unit_ffn(self, i: int, x: np.ndarray) -> np.ndarray:

        p, kind = self.config.ffn_prefix(i), self.config.ffn_kind
        g, u = x @ self.w[p + "gate_proj"].T, x @ self.w[p + "up_proj"].T
        keep = firing_mask(kind, g, u, self.thresholds[i])
        if self.predictor is not None:
            pred = self.predictor.layers[i].predict(x)
            if self.cluster_of is not None:  # a predicted neuron brings its whole cluster
                co = self.cluster_of[i]
                sel = np.zeros((pred.shape[0], int(co.max()) + 1), bool)
                rows, cols = np.nonzero(pred)
                sel[rows, co[cols]] = True
                pred = sel[:, co]
            keep &= pred
        self.computed.append(float(keep.mean()))
        act = silu(g) * u if kind == "swiglu" else np.maximum(g, 0) * (np.maximum(u, 0) if kind == "drelu" else u)
        return (act * keep) @ self.w[p + "down_proj"].T


@dataclass
class QualityReport:
    tokens: int
    top1_agreement: float
    perplexity_dense: float
    perplexity_sparse: float
    computed_share: float  # mean share of FFN neurons computed by the sparse model
    computed_what: str = "FFN neurons computed"

    def summary(self) -> str:
        return (f"sparse vs dense on {self.tokens} held-out tokens: top-1 agreement {self.top1_agreement:.3f}, "
                f"perplexity {self.perplexity_dense:.2f} -> {self.perplexity_sparse:.2f}, {self.computed_what} "
                f"{100 * self.computed_share:.1f} %")


def _nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    z = logits - logits.max(-1, keepdims=True)
    lse = np.log(np.exp(z).sum(-1))
    return lse - z[np.arange(len(targets)), targets]


def clusters_by_frequency(frequency: list[list[float]], cluster: int) -> list[np.ndarray]:
    """Per layer, each neuron's cluster when neurons are stored most frequent first (the flash layout)."""
    out = []
    for f in frequency:
        order = np.argsort(-np.asarray(f), kind="stable")
        pos = np.empty(len(order), np.int64)
        pos[order] = np.arange(len(order))
        out.append(pos // cluster)
    return out


def measure_quality(spec: ModelSpec, token_ids: list[int], thresholds: list[float], predictor=None,
                    window: int = 256, cluster_of: list[np.ndarray] | None = None) -> QualityReport:
    sparse = SparseReference(spec, thresholds, predictor, cluster_of)
    return compare_models(ReferenceModel(spec, "float16"), sparse, token_ids, window,
                          lambda: float(np.mean(sparse.computed)))


def compare_models(dense: ReferenceModel, sparse: ReferenceModel, token_ids: list[int], window: int,
                   computed_share, computed_what: str = "FFN neurons computed") -> QualityReport:
    """Teacher-forced top-1 agreement and both perplexities over windows of ``token_ids``;
    ``computed_share()`` gives the report's share computed, read after the evaluation."""
    windows = [np.asarray(token_ids[s:s + window + 1]) for s in range(0, len(token_ids) - 1, window)]
    windows = [ids for ids in windows if len(ids) >= 2]
    agree, nll_d, nll_s, n = 0, 0.0, 0.0, 0
    for ids, ld, ls in zip(windows, dense.forward_windows([w[:-1] for w in windows]),
                           sparse.forward_windows([w[:-1] for w in windows]), strict=True):
        agree += int((ld.argmax(-1) == ls.argmax(-1)).sum())
        nll_d += float(_nll(ld, ids[1:]).sum())
        nll_s += float(_nll(ls, ids[1:]).sum())
        n += len(ids) - 1
    return QualityReport(n, agree / n, float(np.exp(nll_d / n)), float(np.exp(nll_s / n)), computed_share(),
                         computed_what)
