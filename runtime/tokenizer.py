"""Tokenizer: byte-level BPE through the ``tokenizers`` package, built from GGUF metadata or tokenizer.json."""

from __future__ import annotations

import ctypes
import json
from dataclasses import dataclass, field
from pathlib import Path

from xpuc.runtime.chat_template import render_chat_template
from xpuc.runtime.errors import XpucError


def release_free_heap() -> None:
    """Give the C heap's free pages back to the system (glibc's ``malloc_trim``; a no-op where there is none)."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (AttributeError, OSError):
        pass


# Pre-tokenizer regular expressions of llama.cpp's pre-tokenizer types (tokenizer.ggml.pre).
_QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                   r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_CONTROL, _USER_DEFINED = 3, 4


def _pre_tokenizer(pre: str):
    from tokenizers import Regex, pre_tokenizers

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "smollm":
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    if pre in ("qwen2", "llama-bpe", "llama3"):
        pattern = _QWEN2_PATTERN if pre == "qwen2" else _LLAMA3_PATTERN
        return pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    return byte_level


def tokenizer_json_from_gguf_vocab(tokens: list[str], merges: list[str], token_types: list[int],
                                   pre: str = "default") -> str:
    """Serialize a GGUF ``gpt2``-model vocabulary as a tokenizer.json string."""
    from tokenizers import AddedToken, Tokenizer, decoders, models

    vocab = {t: i for i, t in enumerate(tokens)}
    pairs = []
    for m in merges:
        a, _, b = m.partition(" ")
        pairs.append((a, b))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False))
    tok.pre_tokenizer = _pre_tokenizer(pre)
    tok.decoder = decoders.ByteLevel()
    specials = [AddedToken(t, special=True, normalized=False)
                for t, ty in zip(tokens, token_types, strict=False) if ty in (_CONTROL, _USER_DEFINED)]
    tok.add_special_tokens(specials)
    return tok.to_str()


@dataclass
class XpucTokenizer:
    """Encode/decode text and apply the model's chat template."""

    tokenizer_json: str | None  # None once loaded to run (an artifact's): :meth:`save` needs it, encoding does not
    chat_template: str | None = None
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    add_bos: bool = False

    def __post_init__(self) -> None:
        from tokenizers import Tokenizer

        if self.tokenizer_json is None:
            raise XpucError("a tokenizer needs its tokenizer.json")
        self._tok = Tokenizer.from_str(self.tokenizer_json)
        release_free_heap()  # the JSON parse's transient memory (~30 MiB for a 49k vocabulary)

    @classmethod
    def from_source(cls, src) -> XpucTokenizer:
        return cls(src.tokenizer_json, src.chat_template, src.bos_token_id, list(src.eos_token_ids),
                   src.add_bos)

    @classmethod
    def from_artifact_dir(cls, path: Path) -> XpucTokenizer:
        """An artifact's tokenizer, to run: the JSON text is not kept (13 MiB of Python string for Qwen2.5's)."""
        meta = json.loads((path / "tokenizer_config.json").read_text())
        tok = cls((path / "tokenizer.json").read_text(), meta.get("chat_template"),
                  meta.get("bos_token_id"), list(meta.get("eos_token_ids", [])), bool(meta.get("add_bos")))
        tok.tokenizer_json = None
        release_free_heap()
        return tok

    def save(self, path: Path) -> list[str]:
        if self.tokenizer_json is None:
            raise XpucError("this tokenizer was loaded to run, without its tokenizer.json text: nothing to save")
        (path / "tokenizer.json").write_text(self.tokenizer_json)
        (path / "tokenizer_config.json").write_text(json.dumps({
            "chat_template": self.chat_template, "bos_token_id": self.bos_token_id,
            "eos_token_ids": self.eos_token_ids, "add_bos": self.add_bos}, indent=1))
        return ["tokenizer.json", "tokenizer_config.json"]

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def token_text(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if (self.add_bos if add_bos is None else add_bos) and self.bos_token_id is not None:
            ids = [self.bos_token_id] + ids
        return ids

    def decode(self, ids: list[int], skip_special: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special)

    def apply_chat_template(self, prompt: str, system: str | None = None) -> str:
        """Render a one-turn conversation with the model's template (sandboxed Jinja2), ready for generation."""
        if not self.chat_template:
            raise XpucError("this model has no chat template; run without --chat")
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": prompt}]
        bos = self.token_text(self.bos_token_id) if self.bos_token_id is not None else ""
        eos = self.token_text(self.eos_token_ids[0]) if self.eos_token_ids else ""
        return render_chat_template(self.chat_template, messages, add_generation_prompt=True,
                                    bos_token=bos or "", eos_token=eos or "")
