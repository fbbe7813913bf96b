"""GGUF frontend: a llama.cpp model file -> ModelSpec (weights dequantized lazily by the ``gguf`` package)."""

from __future__ import annotations

import os
from functools import cache
from pathlib import Path

import numpy as np

from xpuc.compiler.spec import LazyWeights, ModelSpec, TokenizerSource
from xpuc.runtime.errors import XpucError
from xpuc.runtime.formats.arch import FFN_KINDS, SUPPORTED_ARCHITECTURES, ArchConfig
from xpuc.runtime.tokenizer import tokenizer_json_from_gguf_vocab
from xpuc.schedules.quant_formats import GGUF_FORMATS

GGUF_MAGIC = b"GGUF"

# GGUF tensor name -> canonical name (per layer names carry "blk.{i}.")
_LAYER_NAMES = {
    "attn_norm.weight": "attn_norm",
    "attn_q.weight": "q_proj",
    "attn_k.weight": "k_proj",
    "attn_v.weight": "v_proj",
    "attn_q.bias": "q_bias",
    "attn_k.bias": "k_bias",
    "attn_v.bias": "v_bias",
    "attn_output.weight": "o_proj",
    "ffn_norm.weight": "ffn_norm",
    "ffn_gate.weight": "gate_proj",
    "ffn_up.weight": "up_proj",
    "ffn_down.weight": "down_proj",
}
_GLOBAL_NAMES = {"token_embd.weight": "embed_tokens", "output_norm.weight": "final_norm",
                 "output.weight": "lm_head"}
# Mixtral-style experts as llama.cpp stores them: the router, and each FFN matrix stacked over the experts
_EXPERT_NAMES = {"ffn_gate_exps.weight": "gate_proj", "ffn_up_exps.weight": "up_proj",
                 "ffn_down_exps.weight": "down_proj"}


def is_gguf(path: str | os.PathLike) -> bool:
    p = Path(path)
    if not p.is_file():
        return False
    with open(p, "rb") as f:
        return f.read(4) == GGUF_MAGIC


def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def _f32(x) -> float:
    """GGUF stores floats as f32: print them back as the decimal that was written (1e-05, not 9.99e-06)."""
    return float(f"{float(x):.7g}")


def _unpermute_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation (interleaved pairs -> Hugging Face rotate-half order)."""
    rows = w.shape[0]
    hd = rows // n_head
    return w.reshape(n_head, hd // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _open_reader(path: Path):
    import gguf

    try:
        reader = gguf.GGUFReader(str(path), "r")
    except Exception as e:  # the gguf package raises ValueError/struct/index errors on damaged files
        raise XpucError(f"{path}: not a readable GGUF file (truncated or corrupted: {e})") from None
    size = path.stat().st_size
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size:
            raise XpucError(f"{path}: truncated: tensor '{t.name}' ends past the end of the file")
    return reader


@cache
def dequantizable(qtype) -> bool:
    """Whether the gguf package can dequantize ``qtype`` (tried once on a zero block)."""
    import gguf

    if qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
        return True
    try:
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        gguf.quants.dequantize(np.zeros((1, size), dtype=np.uint8), qtype)
        return True
    except (KeyError, NotImplementedError, ValueError):
        return False


def _dequantizer(path: Path, tensor, fix_rope_heads: int | None, expert: int | None = None):
    """A loader of ``tensor`` (its slice ``expert`` of a stacked expert tensor), its shape and type name."""
    import gguf

    qtype = tensor.tensor_type
    if not dequantizable(qtype):
        raise XpucError(f"{path}: tensor '{tensor.name}' uses quantization type {qtype.name}, "
                        "which the gguf package cannot dequantize")
    shape = tuple(int(x) for x in reversed(tensor.shape.tolist()))
    name = tensor.name
    if expert is not None:
        shape = shape[1:]

    def load() -> np.ndarray:
        data = tensor.data if expert is None else tensor.data[expert]
        if qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            arr = np.asarray(data, dtype=np.float32)
        else:
            try:
                arr = gguf.quants.dequantize(np.asarray(data), qtype)
            except NotImplementedError:
                raise XpucError(f"{path}: tensor '{name}' uses quantization type {qtype.name}, "
                                "which the gguf package cannot dequantize") from None
        arr = arr.reshape(shape)
        if fix_rope_heads:
            arr = _unpermute_rope(arr, fix_rope_heads)
        return arr

    return load, shape, qtype.name


def _block_loader(tensor, fix_rope_heads: int | None):
    """A loader of ``tensor``'s rows of GGML blocks (Q/K rows put in rotate-half order, as ``load`` does), or
    None when its type has no dense kernel."""
    fmt = GGUF_FORMATS.get(tensor.tensor_type.name)
    if fmt is None or len(tensor.data.shape) != 2:
        return None

    def load() -> tuple[np.ndarray, str]:
        rows = np.asarray(tensor.data)
        return (_unpermute_rope(rows, fix_rope_heads) if fix_rope_heads else rows), fmt

    return load


def _expert_loader(path: Path, tensor, e: int, n_experts: int):
    if len(tensor.shape) != 3 or int(tensor.shape[2]) != n_experts:
        raise XpucError(f"{path}: tensor '{tensor.name}' is not stacked over the {n_experts} experts "
                        f"(shape {list(reversed(tensor.shape.tolist()))})")
    load, shape, qname = _dequantizer(path, tensor, None, expert=e)
    return load, (shape, qname)


def _tokenizer_from_gguf(path: Path, reader) -> TokenizerSource:

    model = _field(reader, "tokenizer.ggml.model")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    if model is None or tokens is None:
        raise XpucError(f"{path}: no tokenizer in the GGUF metadata (tokenizer.ggml.tokens is missing)")
    if model != "gpt2":
        raise XpucError(f"{path}: tokenizer model '{model}' is not supported (supported: gpt2 byte-level BPE)")
    merges = _field(reader, "tokenizer.ggml.merges") or []
    types = _field(reader, "tokenizer.ggml.token_type") or [1] * len(tokens)
    pre = _field(reader, "tokenizer.ggml.pre", "default")
    tok_json = tokenizer_json_from_gguf_vocab(list(tokens), list(merges), list(types), pre)
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    eos_ids = [int(eos)] if eos is not None else []
    eot = _field(reader, "tokenizer.ggml.eot_token_id")
    if eot is not None and int(eot) not in eos_ids:
        eos_ids.append(int(eot))
    bos = _field(reader, "tokenizer.ggml.bos_token_id")
    return TokenizerSource(
        tokenizer_json=tok_json,
        chat_template=_field(reader, "tokenizer.chat_template"),
        bos_token_id=int(bos) if bos is not None else None,
        eos_token_ids=eos_ids,
        add_bos=bool(_field(reader, "tokenizer.ggml.add_bos_token", False)),
    )


def _config_from_gguf(path: Path, reader, arch: str, tensors: dict) -> ArchConfig:
    def key(k, default=None):
        return _field(reader, f"{arch}.{k}", default)

    n_heads = int(key("attention.head_count"))
    n_kv = int(key("attention.head_count_kv", n_heads))
    hidden = int(key("embedding_length"))
    tokens = _field(reader, "tokenizer.ggml.tokens")
    vocab = int(key("vocab_size", 0) or (len(tokens) if tokens is not None else 0)
                or tensors["token_embd.weight"].shape[1])
    ffn_kind = _field(reader, "xpuc.ffn_kind", "swiglu")
    if ffn_kind not in FFN_KINDS:
        raise XpucError(f"{path}: unknown FFN kind '{ffn_kind}' (supported: {', '.join(FFN_KINDS)})")
    return ArchConfig(
        architecture=arch,
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=int(key("feed_forward_length")),
        num_layers=int(key("block_count")),
        num_heads=n_heads,
        num_kv_heads=n_kv,
        head_dim=int(key("attention.key_length", hidden // n_heads)),
        rope_theta=_f32(key("rope.freq_base", 10000.0)),
        rms_norm_eps=_f32(key("attention.layer_norm_rms_epsilon", 1e-5)),
        ffn_kind=ffn_kind,
        tie_embeddings="output.weight" not in tensors,
        qkv_bias="blk.0.attn_q.bias" in tensors,
        context_length=int(key("context_length", 2048)),
        num_experts=int(key("expert_count", 0) or 0),
        experts_per_token=int(key("expert_used_count", 0) or 0) if key("expert_count", 0) else 0,
    )


def load_gguf(path: str | os.PathLike, with_tokenizer: bool = True) -> ModelSpec:
    """Read a GGUF file into a ModelSpec.

    Parameters
    ----------
    path:
        A ``.gguf`` file (llama / mistral / qwen2 architectures).
    with_tokenizer:
        Also build the tokenizer from the GGUF metadata (an error if the file has none).
    """
    path = Path(path)
    if not path.is_file():
        raise XpucError(f"{path}: no such file")
    if not is_gguf(path):
        raise XpucError(f"{path}: not a GGUF file (bad magic number)")
    reader = _open_reader(path)
    arch = _field(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise XpucError(f"{path}: unsupported architecture '{arch}' "
                        f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})")

    tensors = {t.name: t for t in reader.tensors}
    try:
        config = _config_from_gguf(path, reader, arch, tensors)
    except (TypeError, ValueError, KeyError, ZeroDivisionError, OverflowError, AttributeError, IndexError) as e:
        raise XpucError(f"{path}: malformed GGUF metadata ({type(e).__name__}: {e})") from None
    n_heads, n_kv = config.num_heads, config.num_kv_heads
    # llama.cpp permutes Q/K rows of llama-family models; qwen2 is stored in rotate-half order.
    permuted = arch in ("llama", "mistral")
    loaders, meta, blocks = {}, {}, {}
    for name, t in tensors.items():
        canon = _GLOBAL_NAMES.get(name)
        fix = None
        if canon is None and name.startswith("blk."):
            _, idx, rest = name.split(".", 2)
            if rest in _EXPERT_NAMES and config.is_moe:
                for e in range(config.num_experts):
                    canon = f"layers.{int(idx)}.experts.{e}.{_EXPERT_NAMES[rest]}"
                    loaders[canon], meta[canon] = _expert_loader(path, t, e, config.num_experts)
                continue
            if rest == "ffn_gate_inp.weight" and config.is_moe:
                canon = f"layers.{int(idx)}.router"
                load, shape, qname = _dequantizer(path, t, None)
                loaders[canon], meta[canon] = load, (shape, qname)
                continue
            local = _LAYER_NAMES.get(rest)
            if local is None:
                continue
            canon = f"layers.{int(idx)}.{local}"
            if permuted and local in ("q_proj", "q_bias"):
                fix = n_heads
            elif permuted and local in ("k_proj", "k_bias"):
                fix = n_kv
        if canon is None:
            continue
        load, shape, qname = _dequantizer(path, t, fix)
        loaders[canon], meta[canon] = load, (shape, qname)
        if (rows := _block_loader(t, fix)) is not None:
            blocks[canon] = rows
    spec = ModelSpec(config=config, weights=LazyWeights(loaders, meta, blocks),
                     tokenizer=_tokenizer_from_gguf(path, reader) if with_tokenizer else None,
                     source=str(path), source_format="gguf")
    spec.check_complete()
    return spec
