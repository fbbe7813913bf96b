"""Write models in the formats xpuc reads: GGUF (quantized per tensor) and Hugging Face directories.

Used by tests (small models written on the fly) and by model generators.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from xpuc.compiler.frontend_hf import hf_name
from xpuc.runtime.formats.arch import ArchConfig

_GGUF_LAYER = {
    "attn_norm": "attn_norm.weight", "q_proj": "attn_q.weight", "k_proj": "attn_k.weight",
    "v_proj": "attn_v.weight", "q_bias": "attn_q.bias", "k_bias": "attn_k.bias", "v_bias": "attn_v.bias",
    "o_proj": "attn_output.weight", "ffn_norm": "ffn_norm.weight", "gate_proj": "ffn_gate.weight",
    "up_proj": "ffn_up.weight", "down_proj": "ffn_down.weight",
}
_GGUF_GLOBAL = {"embed_tokens": "token_embd.weight", "final_norm": "output_norm.weight", "lm_head": "output.weight"}


def permute_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's conversion permutation (rotate-half order -> interleaved pairs)."""
    hd = w.shape[0] // n_head
    return w.reshape(n_head, 2, hd // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_name(canonical: str) -> str:
    if canonical in _GGUF_GLOBAL:
        return _GGUF_GLOBAL[canonical]
    _, idx, local = canonical.split(".", 2)
    return f"blk.{idx}.{_GGUF_LAYER[local]}"


def write_gguf(path: str | os.PathLike, config: ArchConfig, weights: Mapping[str, np.ndarray],
               qtype: str = "F32", tokenizer: dict | None = None, extra: dict | None = None,
               tensor_types: Mapping[str, str] | None = None,
               raw_blocks: Mapping[str, tuple[np.ndarray, str]] | None = None) -> Path:
    """Write a GGUF file.

    Parameters
    ----------
    qtype:
        GGML type name for 2-D weight matrices whose row length allows it (``F32``, ``F16``, ``Q8_0``,
        ``Q4_0``, ``Q4_1``, ``Q5_0`` …); norms and biases stay F32.
    tensor_types:
        Per-matrix GGML type (canonical names), overriding ``qtype``.
    raw_blocks:
        Matrices given as rows of GGML blocks and their type (canonical names, rows in the file's order): written
        as they are, e.g. K-quant blocks, which the ``gguf`` package cannot quantize.
    tokenizer:
        ``{"tokens": [...], "merges": [...], "token_types": [...], "pre": str, "bos": int, "eos": int,
        "chat_template": str}`` or None for a file without a tokenizer.
    """
    import gguf

    path = Path(path)
    arch = config.architecture
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(config.num_layers)
    w.add_context_length(config.context_length)
    w.add_embedding_length(config.hidden_size)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(config.num_heads)
    w.add_head_count_kv(config.num_kv_heads)
    w.add_rope_freq_base(config.rope_theta)
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    w.add_vocab_size(config.vocab_size)
    if config.head_dim * config.num_heads != config.hidden_size:
        w.add_key_length(config.head_dim)
        w.add_value_length(config.head_dim)
    if config.ffn_kind != "swiglu":
        w.add_string("xpuc.ffn_kind", config.ffn_kind)
    for k, v in (extra or {}).items():
        w.add_string(k, v)
    if tokenizer:
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(tokenizer.get("pre", "default"))
        w.add_token_list(tokenizer["tokens"])
        w.add_token_types(tokenizer.get("token_types", [1] * len(tokenizer["tokens"])))
        w.add_token_merges(tokenizer["merges"])
        if "bos" in tokenizer:
            w.add_bos_token_id(tokenizer["bos"])
        if "eos" in tokenizer:
            w.add_eos_token_id(tokenizer["eos"])
        if tokenizer.get("chat_template"):
            w.add_chat_template(tokenizer["chat_template"])
    permuted = arch in ("llama", "mistral")
    for name in config.weight_shapes():
        if raw_blocks and name in raw_blocks:
            rows, t = raw_blocks[name]
            w.add_tensor(gguf_name(name), rows, raw_shape=rows.shape, raw_dtype=gguf.GGMLQuantizationType[t])
            continue
        q = gguf.GGMLQuantizationType[(tensor_types or {}).get(name, qtype)]
        block = gguf.GGML_QUANT_SIZES[q][0]
        arr = np.asarray(weights[name], dtype=np.float32)
        local = name.split(".", 2)[-1]
        if permuted and local in ("q_proj", "q_bias"):
            arr = permute_rope(arr, config.num_heads)
        elif permuted and local in ("k_proj", "k_bias"):
            arr = permute_rope(arr, config.num_kv_heads)
        if arr.ndim == 2 and q != gguf.GGMLQuantizationType.F32 and arr.shape[1] % block == 0:
            data = gguf.quants.quantize(arr, q)
            w.add_tensor(gguf_name(name), data, raw_shape=data.shape, raw_dtype=q)
        else:
            w.add_tensor(gguf_name(name), arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def write_hf_dir(path: str | os.PathLike, config: ArchConfig, weights: Mapping[str, np.ndarray],
                 shards: int = 1, dtype: str = "float32", tokenizer_json: str | None = None,
                 tokenizer_config: dict | None = None, extra_config: dict | None = None,
                 extra_weights: Mapping[str, np.ndarray] | None = None, skip: frozenset = frozenset()) -> Path:
    """Write config.json + safetensors shards (+ index) + tokenizer files.

    ``extra_config`` keys are merged into config.json; ``extra_weights`` (already in HF naming) go into the
    last shard; canonical names in ``skip`` are left out (an MoE model has no dense FFN)."""
    from safetensors.numpy import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    act = {"swiglu": "silu", "reglu": "relu", "drelu": "relu"}[config.ffn_kind]
    cfg = {
        "architectures": [{"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                           "qwen2": "Qwen2ForCausalLM"}[config.architecture]],
        "model_type": config.architecture, "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size, "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers, "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads, "head_dim": config.head_dim,
        "rope_theta": config.rope_theta, "rms_norm_eps": config.rms_norm_eps, "hidden_act": act,
        "tie_word_embeddings": config.tie_embeddings, "max_position_embeddings": config.context_length,
        "torch_dtype": dtype,
    }
    if config.ffn_kind == "drelu":
        cfg["xpuc_ffn_kind"] = "drelu"
    if config.qkv_bias and config.architecture != "qwen2":
        cfg["attention_bias"] = True
    cfg.update(extra_config or {})
    (path / "config.json").write_text(json.dumps(cfg, indent=1))
    names = [n for n in config.weight_shapes() if n not in skip]
    groups = [names[i::shards] for i in range(shards)]
    index = {}
    for s, group in enumerate(groups):
        fname = "model.safetensors" if shards == 1 else f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        tensors = {hf_name(n): np.ascontiguousarray(np.asarray(weights[n]).astype(dtype)) for n in group}
        if s == shards - 1 and extra_weights:
            tensors.update({k: np.ascontiguousarray(np.asarray(v).astype(dtype)) for k, v in extra_weights.items()})
        save_file(tensors, str(path / fname))
        index.update({k: fname for k in tensors})
    if shards > 1:
        (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": index}, indent=1))
    if tokenizer_json is not None:
        (path / "tokenizer.json").write_text(tokenizer_json)
        (path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config or {}, indent=1))
    return path
