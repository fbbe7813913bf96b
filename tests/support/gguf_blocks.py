"""Random GGML blocks as a GGUF file would hold them, for kernel tests."""

from __future__ import annotations

import numpy as np

from xpuc.schedules.quant_formats import BLOCKS

FP16_AT = {"q4_0": (0,), "q4_1": (0, 2), "q5_0": (0,), "q8_0": (0,), "q4_k": (0, 2), "q5_k": (0, 2),
           "q6_k": (208,)}


def random_rows(rng, fmt: str, rows: int, in_features: int, scale: float = 0.02) -> np.ndarray:
    """Rows of random blocks, as a GGUF file would hold them: random payload bytes, small finite fp16 scales."""
    qk, bb = BLOCKS[fmt]
    data = rng.integers(0, 256, size=(rows, in_features // qk, bb), dtype=np.uint8)
    for at in FP16_AT[fmt]:
        s = (rng.uniform(scale / 10, scale, size=data.shape[:2]) * rng.choice([-1, 1], size=data.shape[:2]))
        data[..., at:at + 2] = s.astype(np.float16).view(np.uint8).reshape(*data.shape[:2], 2)
    return data.reshape(rows, -1)
