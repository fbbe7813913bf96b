"""ProfileStats: per-neuron firing frequencies recorded by ``xpuc profile`` (JSON, versioned)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np

from xpuc.runtime.errors import XpucError
from xpuc.runtime.formats.arch import ArchConfig
from xpuc.runtime.formats.jsonfile import JsonRecord

STATS_SCHEMA = 2  # 2: ``fingerprint`` is the model's (ModelSpec.fingerprint), not only its config's


@dataclass
class ProfileStats(JsonRecord):
    """Per-layer neuron firing frequencies (``frequency[l][i]`` in [0, 1]) and thresholds; ``coactivation``: per
    unit, its neurons in co-activation order (:mod:`xpuc.compiler.coactivation`; empty when not recorded)."""

    SCHEMA, WHAT = STATS_SCHEMA, "profile"

    config: dict
    fingerprint: str
    tokens: int
    target_sparsity: float | None
    thresholds: list[float]
    frequency: list[list[float]]
    schema: int = STATS_SCHEMA
    sources: list[str] = field(default_factory=list)
    coactivation: list[list[int]] = field(default_factory=list)

    @classmethod
    def _from_json(cls, d: dict):
        """Built with every field's type checked (a profile is untrusted input): TypeError otherwise."""
        st = cls(**d)

        def numbers(v) -> bool:
            return isinstance(v, list) and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)

        ok = (isinstance(st.config, dict) and isinstance(st.fingerprint, str) and isinstance(st.tokens, int)
              and (st.target_sparsity is None or isinstance(st.target_sparsity, (int, float)))
              and numbers(st.thresholds) and isinstance(st.frequency, list) and all(numbers(f) for f in st.frequency)
              and isinstance(st.sources, list) and isinstance(st.coactivation, list)
              and all(isinstance(o, list) and all(isinstance(i, int) for i in o) for o in st.coactivation))
        if not ok:
            raise TypeError("profile fields of the wrong type")
        return st

    @property
    def sparsity(self) -> list[float]:
        return [1.0 - float(np.mean(f)) for f in self.frequency]


    def check_matches(self, config: ArchConfig, where: str = "profile", fingerprint: str | None = None) -> None:
        """The statistics describe ``config`` (and, when given, the model with ``fingerprint``)."""
        if self.config != json.loads(json.dumps(config.to_dict())):
            raise XpucError(f"{where} was recorded on a model with another architecture config")
        if fingerprint is not None and self.fingerprint != fingerprint:
            raise XpucError(f"{where} was recorded on another model (weights fingerprint {self.fingerprint} is not "
                            f"this model's {fingerprint}); run xpuc profile on this model file")
        if len(self.frequency) != config.ffn_units or any(len(f) != config.intermediate_size for f in self.frequency):
            raise XpucError(f"{where}: shape does not match the model")
