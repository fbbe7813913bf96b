"""Predictor: the low-rank activation predictors of every FFN unit (safetensors, versioned metadata)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from xpuc.runtime.artifact import atomic_path
from xpuc.runtime.errors import XpucError

PREDICTOR_SCHEMA = "2"  # 2: the fingerprint is the model's (ModelSpec.fingerprint)


@dataclass
class LayerPredictor:
    w1: np.ndarray  # (r, d)
    b1: np.ndarray  # (r,)
    w2: np.ndarray  # (F, r)
    b2: np.ndarray  # (F,)
    threshold: float  # on the logits

    @property
    def rank(self) -> int:
        return int(self.w1.shape[0])

    def logits(self, x: np.ndarray) -> np.ndarray:
        return np.maximum(x @ self.w1.T + self.b1, 0) @ self.w2.T + self.b2

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Boolean mask (…, F) of the neurons predicted to fire."""
        return self.logits(x) > self.threshold


@dataclass
class Predictor:
    layers: list[LayerPredictor]
    fingerprint: str
    recall_target: float

    def save(self, path: str | os.PathLike) -> Path:
        from safetensors.numpy import save_file

        path = Path(path)
        tensors = {}
        for i, lp in enumerate(self.layers):
            for k in ("w1", "b1", "w2", "b2"):
                tensors[f"layers.{i}.{k}"] = np.ascontiguousarray(getattr(lp, k), np.float32)
            tensors[f"layers.{i}.threshold"] = np.array([lp.threshold], np.float32)
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata={"xpuc_predictor": PREDICTOR_SCHEMA,
                                                   "fingerprint": self.fingerprint,
                                                   "recall_target": str(self.recall_target)})
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> Predictor:
        from safetensors import SafetensorError, safe_open

        path = Path(path)
        if not path.is_file():
            raise XpucError(f"{path}: no such predictor file")
        try:
            with safe_open(str(path), "numpy") as f:
                meta = f.metadata() or {}
                if meta.get("xpuc_predictor") != PREDICTOR_SCHEMA:
                    raise XpucError(f"{path}: not an xpuc predictor (schema {PREDICTOR_SCHEMA})")
                n = len({k.split(".")[1] for k in f.keys()})
                layers = [LayerPredictor(*(f.get_tensor(f"layers.{i}.{k}") for k in ("w1", "b1", "w2", "b2")),
                                         float(f.get_tensor(f"layers.{i}.threshold")[0])) for i in range(n)]
        except (SafetensorError, OSError, KeyError) as e:
            raise XpucError(f"{path}: corrupted predictor file ({e})") from None
        return cls(layers, meta["fingerprint"], float(meta["recall_target"]))

    def check_matches(self, fingerprint: str, where: str = "predictor") -> None:
        """The predictor was trained on the model with ``fingerprint`` (ModelSpec.fingerprint)."""
        if self.fingerprint != fingerprint:
            raise XpucError(f"{where} was trained on another model (weights fingerprint {self.fingerprint} is not "
                            f"this model's {fingerprint}); run xpuc profile --predictor on this model file")
