"""Activation sparsity of every projection (TEAL-style, training-free): calibration and measured quality.

At decode time an input of a projection whose magnitude is at most a threshold is taken as zero, so that the
kernel reads only the weight columns of the inputs that remain (:mod:`xpuc.schedules.linear_cols`). The
thresholds are per layer and per projection input — ``attn`` (Q/K/V), ``o``, ``ffn`` (gate/up) and ``down`` —
each the quantile of ``|x|`` at the target sparsity over calibration text, from the fp16-rounded numpy
reference (TEAL's uniform allocation). Quality is measured, never assumed: teacher-forced top-1 agreement and
perplexity of the thresholded model against the dense one on held-out text.
"""

from __future__ import annotations

import numpy as np

from xpuc.compiler.reference import ReferenceModel
from xpuc.compiler.sparse_quality import QualityReport, compare_models
from xpuc.compiler.spec import ModelSpec
from xpuc.runtime.errors import XpucError

POINTS = ("attn", "o", "ffn", "down")  # the inputs of Q/K/V, o, gate/up and down
SAMPLE = 1 << 20  # |x| values kept per (point, layer) for the quantile: a random subset beyond this


def calibrate_thresholds(spec: ModelSpec, token_ids: list[int], sparsity: float, window: int = 256,
                         seed: int = 0, points: tuple[str, ...] = POINTS) -> list[dict[str, float]]:
    """Per layer, the threshold of each projection input (:data:`POINTS`) at which ``sparsity`` of its values
    are at most the threshold on ``token_ids`` (in windows of ``window`` tokens, each its own context); the
    inputs not in ``points`` keep every value (threshold -1)."""
    if not 0.0 <= sparsity < 1.0:
        raise XpucError(f"activation sparsity must be in [0, 1), got {sparsity}")
    if not points or set(points) - set(POINTS):
        raise XpucError(f"projection inputs must be among {', '.join(POINTS)}, got {', '.join(points) or 'none'}")
    if spec.config.is_moe:
        raise XpucError("activation sparsity of every projection is built for dense models")
    if len(token_ids) < 8:
        raise XpucError("calibration text too short (fewer than 8 tokens)")
    rng = np.random.default_rng(seed)
    seen: dict[tuple[str, int], list[np.ndarray]] = {}

    class Recording(ReferenceModel):
        def projection_input(self, point: str, index: int, x: np.ndarray) -> np.ndarray:
            seen.setdefault((point, index), []).append(np.abs(x).ravel().astype(np.float32))
            return x

    ref = Recording(spec, "float16")
    out: list[dict[str, float]] = []
    windows = [token_ids[s:s + window] for s in range(0, len(token_ids), window)]
    for i, _ in ref.layer_passes(windows):
        layer = {}
        for point in POINTS:
            a = np.concatenate(seen.pop((point, i)))
            if a.size > SAMPLE:
                a = rng.choice(a, SAMPLE, replace=False)
            layer[point] = float(np.quantile(a, sparsity)) if sparsity > 0 and point in points else -1.0
        out.append(layer)
    return out


class ThresholdedReference(ReferenceModel):
    """The numpy reference with every projection input thresholded (``|x| <= t`` taken as zero)."""

    def __init__(self, spec: ModelSpec, thresholds: list[dict[str, float]], weight_dtype: str = "float16") -> None:
        if len(thresholds) != spec.config.num_layers:
            raise XpucError(f"{len(thresholds)} layers of thresholds for a model of {spec.config.num_layers}")
        super().__init__(spec, weight_dtype)
        self.thresholds = thresholds
        self.kept: list[float] = []  # share of inputs kept, per projection call

    def projection_input(self, point: str, index: int, x: np.ndarray) -> np.ndarray:
        keep = np.abs(x) > self.thresholds[index][point]
        self.kept.append(float(keep.mean()))
        return np.where(keep, x, 0).astype(x.dtype)


def measure_act_sparsity(spec: ModelSpec, token_ids: list[int], thresholds: list[dict[str, float]],
                         window: int = 256) -> QualityReport:
    """Top-1 agreement and perplexity of the thresholded model against the dense one on ``token_ids``."""
    sparse = ThresholdedReference(spec, thresholds)
    return compare_models(ReferenceModel(spec, "float16"), sparse, token_ids, window,
                          lambda: float(np.mean(sparse.kept)), "projection inputs kept")
