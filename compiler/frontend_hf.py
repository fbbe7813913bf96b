"""Hugging Face frontend: a directory with config.json + *.safetensors (sharded too) -> ModelSpec."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from xpuc.compiler.spec import LazyWeights, ModelSpec, TokenizerSource
from xpuc.runtime.errors import XpucError
from xpuc.runtime.formats.arch import FFN_KINDS, SUPPORTED_ARCHITECTURES, ArchConfig

_MODEL_TYPES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "mixtral": "mistral"}
_ACTIVATIONS = {"silu": "swiglu", "swish": "swiglu", "relu": "reglu", "drelu": "drelu"}
_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm",
    "self_attn.q_proj.weight": "q_proj",
    "self_attn.k_proj.weight": "k_proj",
    "self_attn.v_proj.weight": "v_proj",
    "self_attn.q_proj.bias": "q_bias",
    "self_attn.k_proj.bias": "k_bias",
    "self_attn.v_proj.bias": "v_bias",
    "self_attn.o_proj.weight": "o_proj",
    "post_attention_layernorm.weight": "ffn_norm",
    "mlp.gate_proj.weight": "gate_proj",
    "mlp.up_proj.weight": "up_proj",
    "mlp.down_proj.weight": "down_proj",
}
_GLOBAL_NAMES = {"model.embed_tokens.weight": "embed_tokens", "model.norm.weight": "final_norm",
                 "lm_head.weight": "lm_head"}


def is_hf_dir(path: str | os.PathLike) -> bool:
    return Path(path).is_dir() and (Path(path) / "config.json").is_file()


_MOE_NAMES = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}  # Mixtral's expert matrices


def canonical_name(hf_name: str) -> str | None:
    if hf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[hf_name]
    if hf_name.startswith("model.layers."):
        _, _, idx, rest = hf_name.split(".", 3)
        if rest == "block_sparse_moe.gate.weight":
            return f"layers.{int(idx)}.router"
        if rest.startswith("block_sparse_moe.experts."):
            parts = rest.split(".")  # block_sparse_moe experts E w1 weight
            if len(parts) == 5 and parts[3] in _MOE_NAMES and parts[4] == "weight":
                return f"layers.{int(idx)}.experts.{int(parts[2])}.{_MOE_NAMES[parts[3]]}"
            return None
        local = _LAYER_NAMES.get(rest)
        return f"layers.{int(idx)}.{local}" if local else None
    return None


def hf_name(canonical: str) -> str:
    """Inverse of :func:`canonical_name` (used by writers of HF directories)."""
    for k, v in _GLOBAL_NAMES.items():
        if v == canonical:
            return k
    _, idx, local = canonical.split(".", 2)
    for k, v in _LAYER_NAMES.items():
        if v == local:
            return f"model.layers.{idx}.{k}"
    raise KeyError(canonical)


_MALFORMED = (TypeError, ValueError, KeyError, ZeroDivisionError, OverflowError, AttributeError)


def config_from_hf(cfg: dict, where: str) -> ArchConfig:
    """The ArchConfig of a Hugging Face ``config.json``; a missing or ill-typed field is one XpucError."""
    try:
        return _config_from_hf(cfg, where)
    except _MALFORMED as e:
        raise XpucError(f"{where}: malformed config ({type(e).__name__}: {e})") from None


def _config_from_hf(cfg: dict, where: str) -> ArchConfig:
    mt = cfg.get("model_type")
    experts, top_k = int(cfg.get("num_local_experts") or 0), int(cfg.get("num_experts_per_tok") or 0)
    if experts and not 1 <= top_k <= experts:
        raise XpucError(f"{where}: {experts} experts with num_experts_per_tok={top_k}")
    arch = _MODEL_TYPES.get(mt)
    if arch is None:
        raise XpucError(f"{where}: unsupported architecture '{mt}' "
                        f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
    act = cfg.get("xpuc_ffn_kind") or _ACTIVATIONS.get(cfg.get("hidden_act", "silu"))
    if act not in FFN_KINDS:
        raise XpucError(f"{where}: unsupported activation '{cfg.get('hidden_act')}' "
                        f"(supported: {', '.join(_ACTIVATIONS)})")
    n_heads = int(cfg["num_attention_heads"])
    hidden = int(cfg["hidden_size"])
    return ArchConfig(
        architecture=arch,
        vocab_size=int(cfg["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(cfg["intermediate_size"]),
        num_layers=int(cfg["num_hidden_layers"]),
        num_heads=n_heads,
        num_kv_heads=int(cfg.get("num_key_value_heads") or n_heads),
        head_dim=int(cfg.get("head_dim") or hidden // n_heads),
        rope_theta=float(cfg.get("rope_theta", 10000.0)),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        ffn_kind=act,
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=arch == "qwen2" or bool(cfg.get("attention_bias", False)),
        context_length=int(cfg.get("max_position_embeddings", 2048)),
        num_experts=experts,
        experts_per_token=top_k if experts else 0,
    )


def _tokenizer_from_dir(path: Path) -> TokenizerSource:
    tj = path / "tokenizer.json"
    if not tj.is_file():
        raise XpucError(f"{path}: missing tokenizer (no tokenizer.json); copy the model's tokenizer.json into "
                        "the directory")
    meta = {}
    if (path / "tokenizer_config.json").is_file():
        meta = json.loads((path / "tokenizer_config.json").read_text())
    gen = {}
    if (path / "generation_config.json").is_file():
        gen = json.loads((path / "generation_config.json").read_text())
    text = tj.read_text()
    vocab = json.loads(text).get("added_tokens", [])
    by_content = {t["content"]: t["id"] for t in vocab}

    def token_id(value):
        if isinstance(value, dict):
            value = value.get("content")
        return by_content.get(value) if isinstance(value, str) else None

    eos = gen.get("eos_token_id", token_id(meta.get("eos_token")))
    eos_ids = [int(e) for e in (eos if isinstance(eos, list) else [eos]) if e is not None]
    bos = gen.get("bos_token_id", token_id(meta.get("bos_token")))
    return TokenizerSource(tokenizer_json=text, chat_template=meta.get("chat_template"),
                           bos_token_id=bos, eos_token_ids=eos_ids,
                           add_bos=bool(meta.get("add_bos_token", False)))


def load_hf_dir(path: str | os.PathLike, with_tokenizer: bool = True) -> ModelSpec:
    """Read a Hugging Face model directory (config.json + one or more .safetensors files)."""
    from safetensors import safe_open

    path = Path(path)
    try:
        cfg = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise XpucError(f"{path}/config.json: unreadable ({e})") from None
    config = config_from_hf(cfg, str(path))
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise XpucError(f"{path}: no .safetensors files")
    loaders, meta = {}, {}
    for f in files:
        try:
            handle = safe_open(str(f), framework="numpy")
            keys = list(handle.keys())
        except Exception as e:
            raise XpucError(f"{f}: not a readable safetensors file ({e})") from None
        for k in keys:
            canon = canonical_name(k)
            if canon is None:
                continue
            sl = handle.get_slice(k)
            shape = tuple(sl.get_shape())

            def load(handle=handle, k=k, f=f):
                try:
                    return np.asarray(handle.get_tensor(k), dtype=np.float32)
                except Exception as e:
                    raise XpucError(f"{f}: tensor '{k}' unreadable ({e})") from None

            loaders[canon], meta[canon] = load, (shape, sl.get_dtype())
    spec = ModelSpec(config=config, weights=LazyWeights(loaders, meta),
                     tokenizer=_tokenizer_from_dir(path) if with_tokenizer else None,
                     source=str(path), source_format="hf")
    spec.check_complete()
    return spec
