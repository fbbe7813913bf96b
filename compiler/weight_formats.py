"""Which format each matrix of a compiled decoder is stored in (`xpuc compile --quantize keep`).

A GGUF file's quantized matrices are kept exactly as the file stores them wherever a dense kernel reads that
format (:data:`xpuc.schedules.quant_formats.GGUF_FORMATS`) and the row tiles into its blocks; float matrices
stay float16; any other matrix is converted to q8_0, and the conversion is reported.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from xpuc.compiler.spec import ModelSpec
from xpuc.runtime.errors import XpucError
from xpuc.schedules.quant_formats import BLOCKS, GGUF_FORMATS

FLOAT_TYPES = ("F32", "F16", "BF16")  # GGUF float types: kept as float16
CONVERT_TO = "q8_0"


@dataclass
class WeightFormats:
    """Matrix name (ModelSpec naming) -> format (None: float16), and the matrices that had to be converted."""

    formats: dict[str, str | None]
    converted: dict[str, str] = field(default_factory=dict)  # name -> its stored type

    def summary(self) -> str:
        kept = Counter(f or "float16" for n, f in self.formats.items() if n not in self.converted)
        text = "kept " + ", ".join(f"{k} x{v}" for k, v in sorted(kept.items()))
        if self.converted:
            why = Counter(self.converted.values())
            text += (f"; converted to {CONVERT_TO}: " + ", ".join(f"{k} x{v}" for k, v in sorted(why.items()))
                     + " (no kernel for that type, or rows that do not tile into its blocks)")
        return text


def matrix_names(spec: ModelSpec) -> list[str]:
    c = spec.config
    names = ["embed_tokens"] + ([] if c.tie_embeddings else ["lm_head"])
    for i in range(c.num_layers):
        names += [f"layers.{i}.{m}_proj" for m in ("q", "k", "v", "o", "gate", "up", "down")]
    return names


def weight_formats(spec: ModelSpec) -> WeightFormats:
    """Decide each matrix's format for ``spec`` (a GGUF model); see the module docstring."""
    meta = getattr(spec.weights, "meta", {})
    if spec.source_format != "gguf" or not meta:
        raise XpucError(f"{spec.source}: --quantize keep needs a GGUF model (it keeps the file's formats)")
    if spec.config.is_moe:
        raise XpucError(f"{spec.source}: the compiled decoder has no mixture-of-experts layers; use xpuc pack")
    out = WeightFormats({})
    for name in matrix_names(spec):
        shape, stored = meta[name]
        fmt = GGUF_FORMATS.get(stored)
        if fmt is not None and shape[1] % BLOCKS[fmt][0] == 0:
            out.formats[name] = fmt
        elif stored in FLOAT_TYPES:
            out.formats[name] = None
        else:
            out.formats[name] = CONVERT_TO
            out.converted[name] = stored
    return out
