"""Perplexity of a session (compiled, split or offloaded engine) on a token stream, by llama.cpp's
``llama-perplexity`` method.

The tokens are cut into chunks of ``ctx``; each chunk is evaluated from an empty KV cache (its first token
replaced by BOS when the tokenizer adds one) and only its second half is scored: the logits at positions
``ctx/2 .. ctx-2`` predict tokens ``ctx/2+1 .. ctx-1``, so every scored token sees at least half a context.
The first half goes through ``prefill``, the scored half through ``decode`` one token at a time (the session
protocol returns the logits of the last token fed). ``PPL = exp(mean NLL)``; its error is llama.cpp's:
``PPL * sqrt(var(NLL) / (n - 1))``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from xpuc.runtime.errors import XpucError


@dataclass
class PerplexityResult:
    ppl: float
    stderr: float
    mean_nll: float
    tokens_scored: int
    ctx: int
    chunks: int
    chunk_ppl: list[float] = field(default_factory=list)  # running PPL after each chunk (llama.cpp's [i]x list)


def _nll(logits: np.ndarray, token: int) -> float:
    z = logits.astype(np.float64)
    m = z.max()
    return float(m + np.log(np.exp(z - m).sum()) - z[token])


def perplexity(session, tokens: Sequence[int], ctx: int, bos: int | None = None, max_chunks: int | None = None,
               progress: Callable[[int, int, float], None] | None = None) -> PerplexityResult:
    """Score ``tokens`` in chunks of ``ctx`` (see the module docstring).

    Parameters
    ----------
    session:
        Any engine's session (``reset`` / ``prefill`` / ``decode`` / ``max_context``).
    tokens:
        The text's token ids (without BOS).
    ctx:
        Tokens per chunk (at least 4, at most the session's KV cache).
    bos:
        BOS id that replaces each chunk's first token (as llama.cpp does for models that add BOS), or None.
    max_chunks:
        Stop after this many chunks.
    progress:
        ``progress(chunk, chunks, running_ppl)`` after each chunk.
    """
    if ctx < 4:
        raise XpucError(f"--ctx must be at least 4 tokens, got {ctx}")
    if ctx > session.max_context:
        raise XpucError(f"--ctx {ctx} exceeds the KV cache of {session.max_context} tokens")
    chunks = len(tokens) // ctx
    if max_chunks is not None:
        chunks = min(chunks, max_chunks)
    if chunks < 1:
        raise XpucError(f"the text has {len(tokens)} tokens, fewer than one chunk of {ctx} (lower --ctx or give "
                        "a longer text)")
    first = ctx // 2
    nll, running = [], []
    for c in range(chunks):
        chunk = [int(t) for t in tokens[c * ctx:(c + 1) * ctx]]
        if bos is not None:
            chunk[0] = bos
        session.reset()
        logits = session.prefill(chunk[:first + 1])
        for j in range(first + 1, ctx):  # logits at position j-1 predict chunk[j]
            nll.append(_nll(logits, chunk[j]))
            if j < ctx - 1:
                logits = session.decode(chunk[j])
        running.append(float(np.exp(np.mean(nll))))
        if progress:
            progress(c + 1, chunks, running[-1])
    a = np.asarray(nll, np.float64)
    ppl = float(np.exp(a.mean()))
    var = float(np.mean(a * a) - a.mean() ** 2)
    stderr = ppl * float(np.sqrt(var / (a.size - 1))) if a.size > 1 and var > 0 else 0.0
    return PerplexityResult(ppl, stderr, float(a.mean()), int(a.size), ctx, chunks, running)
