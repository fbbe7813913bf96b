"""Pick the frontend for a model path."""

from __future__ import annotations

import os
from pathlib import Path

from xpuc.compiler.frontend_gguf import is_gguf, load_gguf
from xpuc.compiler.frontend_hf import is_hf_dir, load_hf_dir
from xpuc.compiler.spec import ModelSpec
from xpuc.runtime.errors import XpucError


def load_model(path: str | os.PathLike, with_tokenizer: bool = True) -> ModelSpec:
    """Load a GGUF file or a Hugging Face directory into a ModelSpec."""

    p = Path(path)
    if not p.exists():
        raise XpucError(f"{p}: no such file or directory")
    if p.is_dir():
        if is_hf_dir(p):
            return load_hf_dir(p, with_tokenizer)
        raise XpucError(f"{p}: a directory without config.json is not a model "
                        "(expected a Hugging Face directory or a .gguf file)")
    if is_gguf(p):
        return load_gguf(p, with_tokenizer)
    if p.suffix == ".onnx":
        raise XpucError(f"{p}: ONNX models are compiled as prefill graphs, not as language models")
    raise XpucError(f"{p}: not a GGUF file (bad magic number) and not a Hugging Face directory")
