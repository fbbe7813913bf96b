"""ModelSpec: the single description of a model that every lowering, the reference and the runtime share.

Weights use canonical names and (out_features, in_features) layout, dequantized to float32 on access:

``embed_tokens``            (vocab, d)
``layers.{i}.attn_norm``    (d,)
``layers.{i}.q_proj``       (n_heads*head_dim, d)   ``q_bias`` / ``k_bias`` / ``v_bias`` when ``qkv_bias``
``layers.{i}.k_proj``       (n_kv_heads*head_dim, d)
``layers.{i}.v_proj``       (n_kv_heads*head_dim, d)
``layers.{i}.o_proj``       (d, n_heads*head_dim)
``layers.{i}.ffn_norm``     (d,)
``layers.{i}.gate_proj``    (d_ff, d)
``layers.{i}.up_proj``      (d_ff, d)
``layers.{i}.down_proj``    (d, d_ff)
``final_norm``              (d,)

A mixture-of-experts layer (``num_experts > 0``, Mixtral's routing: softmax over the top
``experts_per_token`` router logits) has instead of the three FFN matrices

``layers.{i}.router``                 (n_experts, d)
``layers.{i}.experts.{e}.gate_proj``  (d_ff, d)      and ``up_proj``, ``down_proj`` per expert

Every FFN — a dense layer's or one expert's — is an *FFN unit* ``u`` (``ffn_units``, ``ffn_prefix(u)``):
profiles, predictors, plans and flash layouts are per unit.
``lm_head``                 (vocab, d), absent when embeddings are tied

Q and K rows follow the Hugging Face "rotate half" RoPE convention.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

import numpy as np

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
        from xpuc.compiler.errors import XpucError

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
        from xpuc.compiler.errors import XpucError

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


class LazyWeights(Mapping):
    """Name -> float32 array, each produced (dequantized) only when asked for, never cached."""

    def __init__(self, loaders: dict[str, Callable[[], np.ndarray]],
                 meta: dict[str, tuple[tuple[int, ...], str]] | None = None) -> None:
        self._loaders = loaders
        self.meta = meta or {}  # name -> (shape, stored dtype / quantization name)

    def __getitem__(self, name: str) -> np.ndarray:
        return np.ascontiguousarray(self._loaders[name](), dtype=np.float32)

    def __iter__(self) -> Iterator[str]:
        return iter(self._loaders)

    def __len__(self) -> int:
        return len(self._loaders)


@dataclass
class TokenizerSource:
    """Everything needed to rebuild the tokenizer: a tokenizer.json string and the chat template."""

    tokenizer_json: str
    chat_template: str | None = None
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    add_bos: bool = False


@dataclass
class ModelSpec:
    """Architecture config + named weights + tokenizer of one model."""

    config: ArchConfig
    weights: Mapping[str, np.ndarray]
    tokenizer: TokenizerSource | None
    source: str
    source_format: str

    def check_complete(self) -> None:
        """Raise XpucError naming the first missing or mis-shaped weight."""
        from xpuc.compiler.errors import XpucError

        meta = getattr(self.weights, "meta", {})
        for name, shape in self.config.weight_shapes().items():
            if name not in self.weights:
                raise XpucError(f"{self.source}: weight '{name}' is missing")
            got = meta[name][0] if name in meta else self.weights[name].shape
            if tuple(got) != tuple(shape):
                raise XpucError(f"{self.source}: weight '{name}' has shape {tuple(got)}, expected {shape}")

    def fingerprint(self) -> str:
        """A digest that tells two models apart: the config, every norm vector and the last layer's K projection.

        Profiles, predictors, plans and packed models record it, and every place that combines them with a model
        checks it, so statistics of one model are never applied to another with the same architecture. Values are
        rounded to float16 first, so the same weights stored as float32, float16 or bfloat16 agree; a re-quantized
        copy (q4_0 of an f16 file) is another model. The tensors hashed are small (O(layers x hidden) plus one
        projection), so the digest costs well under a second even for a 7B model.
        """
        import hashlib
        import json

        c = self.config
        h = hashlib.sha256(json.dumps(c.to_dict(), sort_keys=True).encode())
        names = [f"layers.{i}.{n}" for i in range(c.num_layers) for n in ("attn_norm", "ffn_norm")]
        names += ["final_norm", f"layers.{c.num_layers - 1}.k_proj"]
        for name in names:
            h.update(name.encode())
            h.update(np.ascontiguousarray(self.weights[name], dtype=np.float16).tobytes())
        return h.hexdigest()[:16]
