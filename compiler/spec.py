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

import hashlib
import json
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

import numpy as np

from xpuc.runtime.errors import XpucError
from xpuc.runtime.formats.arch import ArchConfig


class LazyWeights(Mapping):
    """Name -> float32 array, each produced (dequantized) only when asked for, never cached."""

    def __init__(self, loaders: dict[str, Callable[[], np.ndarray]],
                 meta: dict[str, tuple[tuple[int, ...], str]] | None = None,
                 blocks: dict[str, Callable[[], tuple[np.ndarray, str]]] | None = None) -> None:
        self._loaders = loaders
        self.meta = meta or {}  # name -> (shape, stored dtype / quantization name)
        self._blocks = blocks or {}  # name -> loader of (rows of GGML blocks, format), quantized GGUF tensors

    def blocks(self, name: str) -> tuple[np.ndarray, str] | None:
        """The tensor's rows of GGML blocks as the file stores them (uint8, (out, bytes per row)) and their
        format (:data:`xpuc.schedules.quant_formats.BLOCKS`), or None when it is not stored in such a format."""
        load = self._blocks.get(name)
        return None if load is None else load()

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

        c = self.config
        h = hashlib.sha256(json.dumps(c.to_dict(), sort_keys=True).encode())
        names = [f"layers.{i}.{n}" for i in range(c.num_layers) for n in ("attn_norm", "ffn_norm")]
        names += ["final_norm", f"layers.{c.num_layers - 1}.k_proj"]
        for name in names:
            h.update(name.encode())
            h.update(np.ascontiguousarray(self.weights[name], dtype=np.float16).tobytes())
        return h.hexdigest()[:16]
