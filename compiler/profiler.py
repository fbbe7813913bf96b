"""Offline profiler: FFN neuron activation statistics of a model on calibration text.

For every layer and neuron the share of tokens on which the neuron *fires*: ``act != 0`` for the ReLU
kinds; for SwiGLU models (not sparse by nature) the neuron fires when ``|silu(gate x)| > t_l``, with the
per-layer threshold ``t_l`` chosen on the same text for a target sparsity (CATS/TEAL-style). The
statistics are the planner's input (hot/cold split, expected reads per token).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from xpuc.compiler.coactivation import coactivation_order
from xpuc.compiler.reference import ReferenceModel, silu
from xpuc.compiler.spec import ModelSpec
from xpuc.runtime.errors import XpucError
from xpuc.runtime.formats.profile_stats import ProfileStats


def read_text_files(paths: list[str | os.PathLike]) -> str:
    """Concatenate text files; a missing or empty file is an error."""
    parts = []
    for p in paths:
        p = Path(p)
        if not p.is_file():
            raise XpucError(f"{p}: no such text file")
        text = p.read_text(errors="replace")
        if not text.strip():
            raise XpucError(f"{p}: empty text file")
        parts.append(text)
    if not parts:
        raise XpucError("no calibration text given (--text FILE)")
    return "\n".join(parts)


def ffn_activations(spec: ModelSpec, token_ids: list[int], window: int = 256):
    """Yield ``(unit, x, g, u)`` for every FFN unit, layer by layer: the RMSNorm'd input and the gate and up
    pre-activations of the unit (a layer's FFN; for MoE layers each expert on the tokens routed to it) over
    all windows of ``token_ids`` (each window its own context), from the fp16-rounded numpy reference. Each
    layer's weights are read once for all windows (:meth:`ReferenceModel.layer_passes`)."""

    seen: list = []

    class Recording(ReferenceModel):
        def unit_ffn(self, unit: int, x: np.ndarray) -> np.ndarray:
            p = self.config.ffn_prefix(unit)
            g, u = x @ self.w[p + "gate_proj"].T, x @ self.w[p + "up_proj"].T
            seen.append((unit, x, g, u))
            return super().unit_ffn(unit, x)

    ref = Recording(spec, "float16")
    windows = [token_ids[s:s + window] for s in range(0, len(token_ids), window)]
    for _ in ref.layer_passes(windows):
        yield from seen
        seen.clear()


def firing_mask(kind: str, g: np.ndarray, u: np.ndarray, threshold: float) -> np.ndarray:
    """Which neurons fire: ``act != 0`` for the ReLU kinds, ``|silu(g)| > threshold`` for SwiGLU."""

    if kind == "swiglu":
        return np.abs(silu(g)) > threshold
    if kind == "reglu":
        return (g > 0) & (u != 0)
    return (g > 0) & (u > 0)


def profile_model(spec: ModelSpec, token_ids: list[int], target_sparsity: float | None = None,
                  window: int = 256) -> ProfileStats:
    """Run the numpy reference over ``token_ids`` (in windows) and record firing frequencies per neuron, and per
    unit a co-activation order of its neurons (for the flash layout).

    A frequency is the share of all tokens for which the neuron fires: an expert's neurons only fire for
    the tokens routed to it, so the frequencies of all units are comparable when the planner ranks them."""

    c = spec.config
    if c.ffn_kind == "swiglu" and target_sparsity is None:
        raise XpucError("a SwiGLU model needs --sparsity (it is made sparse by thresholding)")
    if len(token_ids) < 8:
        raise XpucError("calibration text too short (fewer than 8 tokens)")
    acts: list[list[np.ndarray]] = [[] for _ in range(c.ffn_units)]
    for i, _x, g, u in ffn_activations(spec, token_ids, window):
        if c.ffn_kind == "swiglu":
            acts[i].append(np.abs(silu(g)).astype(np.float32))
        else:
            acts[i].append(firing_mask(c.ffn_kind, g, u, 0.0))  # bool: 1 byte per (token, neuron)
    thresholds, freq, orders = [], [], []
    n = len(token_ids)
    for i in range(c.ffn_units):
        if not acts[i]:  # an expert no calibration token was routed to
            thresholds.append(0.0)
            freq.append([0.0] * c.intermediate_size)
            orders.append(list(range(c.intermediate_size)))
            continue
        a = np.concatenate(acts[i])
        if c.ffn_kind == "swiglu":
            t = float(np.quantile(a, target_sparsity))
            thresholds.append(t)
            fired = a > t
        else:
            thresholds.append(0.0)
            fired = a > 0
        freq.append((fired.sum(0) / n).round(5).tolist())
        orders.append(coactivation_order(fired))
    return ProfileStats(config=c.to_dict(), fingerprint=spec.fingerprint(), tokens=len(token_ids),
                        target_sparsity=target_sparsity, thresholds=thresholds, frequency=freq,
                        coactivation=orders)
