"""ArchConfig: the architecture hyper-parameters every artifact records (manifests, plans, profiles)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from xpuc.runtime.errors import XpucError

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2")
FFN_KINDS = ("swiglu", "reglu", "drelu")


@dataclass(frozen=True)
class ArchConfig:
    """Architecture hyper-parameters of a decoder-only transformer."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    ffn_kind: str = "swiglu"
    tie_embeddings: bool = False
    qkv_bias: bool = False
    context_length: int = 2048
    num_experts: int = 0  # 0: dense FFN layers
    experts_per_token: int = 0

    def __post_init__(self) -> None:
        """Sizes are positive integers within reason and the heads fit: a damaged file's config fails here."""

        limits = {"vocab_size": 1 << 22, "hidden_size": 1 << 16, "intermediate_size": 1 << 20, "num_layers": 1024,
                  "num_heads": 1024, "num_kv_heads": 1024, "head_dim": 4096, "context_length": 1 << 22}
        for name, high in limits.items():
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= high:
                raise XpucError(f"config: {name} must be an integer in [1, {high}], got {v!r}")
        for name in ("rope_theta", "rms_norm_eps"):
            v = getattr(self, name)
            if not isinstance(v, int | float) or isinstance(v, bool) or not 0 < v < float("inf"):
                raise XpucError(f"config: {name} must be a positive number, got {v!r}")
        if self.num_heads % self.num_kv_heads:
            raise XpucError(f"config: {self.num_heads} attention heads are not a multiple of {self.num_kv_heads} "
                            "KV heads")
        if self.ffn_kind not in FFN_KINDS or not isinstance(self.architecture, str):
            raise XpucError(f"config: unknown FFN kind {self.ffn_kind!r} (supported: {', '.join(FFN_KINDS)})")
        if not all(isinstance(getattr(self, n), bool) for n in ("tie_embeddings", "qkv_bias")):
            raise XpucError("config: tie_embeddings and qkv_bias must be true or false")
        e, k = self.num_experts, self.experts_per_token
        if (not isinstance(e, int) or not isinstance(k, int) or not 0 <= e <= 1024
                or not (0 < k <= e if e else k == 0)):
            raise XpucError(f"config: {k!r} experts per token out of {e!r} experts")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        if not self.num_experts:  # dense models keep the fields (and fingerprints) they always had
            del d["num_experts"], d["experts_per_token"]
        return d

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def ffn_units(self) -> int:
        """FFNs of the model: one per layer, or one per expert of every layer."""
        return self.num_layers * max(self.num_experts, 1)

    def ffn_prefix(self, unit: int) -> str:
        """Weight-name prefix of FFN unit ``unit`` (``layers.{i}.`` or ``layers.{i}.experts.{e}.``)."""
        if not self.is_moe:
            return f"layers.{unit}."
        return f"layers.{unit // self.num_experts}.experts.{unit % self.num_experts}."

    def unit_layer(self, unit: int) -> int:
        return unit // max(self.num_experts, 1)

    @classmethod
    def from_dict(cls, d: Mapping) -> ArchConfig:
        """The config of a manifest, plan or profile; a missing field is an XpucError like a bad value."""

        fields = dataclasses.fields(cls)
        if not isinstance(d, Mapping):
            raise XpucError(f"config: expected an object, got {type(d).__name__}")
        missing = [f.name for f in fields if f.name not in d and f.default is dataclasses.MISSING]
        if missing:
            raise XpucError(f"config: missing field '{missing[0]}'")
        names = {f.name for f in fields}
        return cls(**{k: v for k, v in d.items() if k in names})

    def weight_shapes(self) -> dict[str, tuple[int, ...]]:
        """Canonical weight names and shapes this configuration needs."""
        d, f, hd = self.hidden_size, self.intermediate_size, self.head_dim
        shapes: dict[str, tuple[int, ...]] = {"embed_tokens": (self.vocab_size, d), "final_norm": (d,)}
        if not self.tie_embeddings:
            shapes["lm_head"] = (self.vocab_size, d)
        for i in range(self.num_layers):
            p = f"layers.{i}."
            shapes.update({
                p + "attn_norm": (d,),
                p + "q_proj": (self.num_heads * hd, d),
                p + "k_proj": (self.num_kv_heads * hd, d),
                p + "v_proj": (self.num_kv_heads * hd, d),
                p + "o_proj": (d, self.num_heads * hd),
                p + "ffn_norm": (d,),
            })
            if self.is_moe:
                shapes[p + "router"] = (self.num_experts, d)
            for e in range(max(self.num_experts, 1)):
                q = self.ffn_prefix(i * max(self.num_experts, 1) + e)
                shapes.update({q + "gate_proj": (f, d), q + "up_proj": (f, d), q + "down_proj": (d, f)})
            if self.qkv_bias:
                shapes.update({p + "q_bias": (self.num_heads * hd,), p + "k_bias": (self.num_kv_heads * hd,),
                               p + "v_bias": (self.num_kv_heads * hd,)})
        return shapes

    def num_parameters(self) -> int:
        return int(sum(int(np.prod(s)) for s in self.weight_shapes().values()))
