"""One decode API: the session protocol every engine implements, and the one generation loop over it.

Engines (:class:`~xpuc.runtime.session.DecoderSession` for a compiled decoder, :class:`SplitSession` for GPU/NPU
prefill handing its KV cache to the CPU decoder, :class:`~xpuc.runtime.offload.OffloadModel` for a packed model
with its FFN on flash) implement :class:`DecodeSession`; :func:`generate` does the rest -- sampling, stop tokens,
the context limit, incremental detokenization and timing -- for ``xpuc run``, ``xpuc bench`` and the Python API.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from xpuc.runtime.errors import XpucError
from xpuc.runtime.sampler import Sampler, SamplingParams


class DecodeSession(Protocol):
    """One sequence of one model: its KV cache and the position in it."""

    max_context: int  # tokens the KV cache holds (prompt + generated)

    @property
    def position(self) -> int:
        """Tokens fed so far."""

    def reset(self) -> None:
        """Forget the sequence (position 0)."""

    def prefill(self, ids: Sequence[int]) -> np.ndarray:
        """Feed prompt tokens; returns the logits after the last one (float32, (vocab,))."""

    def decode(self, token: int) -> np.ndarray:
        """Feed one token; returns the next-token logits."""


@dataclass
class GenerationResult:
    prompt_tokens: list[int]
    tokens: list[int]
    text: str
    prefill_s: float
    decode_s: float
    stop_reason: str  # "eos" | "length" | "context"
    first_logits: np.ndarray | None = field(default=None, repr=False)
    prefill_on: str = "cpu"
    handoff: object | None = None  # KV hand-off statistics of a split session
    step_seconds: list[float] = field(default_factory=list, repr=False)  # each decode call
    pending_text: str = ""  # the end of ``text`` that ``on_text`` was not given (all of it without ``on_text``)

    @property
    def prefill_tok_s(self) -> float:
        return len(self.prompt_tokens) / self.prefill_s if self.prefill_s > 0 else 0.0

    @property
    def decode_tok_s(self) -> float:
        n = max(len(self.tokens) - 1, 0)  # the first token comes from prefill's logits
        return n / self.decode_s if self.decode_s > 0 and n else 0.0


class TextStream:
    """Incremental detokenization: the text each new token adds, held back while it ends in a partial character."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.tokens: list[int] = []
        self.shown = ""

    def push(self, token: int) -> str:
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens)
        if not text.startswith(self.shown) or text.endswith("\ufffd"):
            return ""
        piece, self.shown = text[len(self.shown):], text
        return piece

    def rest(self) -> str:
        """What the final text adds to what was shown (a trailing partial character, a changed suffix)."""
        text = self.tokenizer.decode(self.tokens)
        return text[len(self.shown):] if text.startswith(self.shown) else ""


def generate(session: DecodeSession, prompt_ids: Sequence[int], max_tokens: int,
             sampling: SamplingParams | None = None, stop_ids: Sequence[int] = (), tokenizer=None,
             vocab_size: int | None = None, on_text: Callable[[str], None] | None = None,
             on_token: Callable[[int], None] | None = None) -> GenerationResult:
    """Prefill ``prompt_ids`` and decode up to ``max_tokens`` tokens.

    Parameters
    ----------
    session:
        Any engine's :class:`DecodeSession`; it is reset first.
    prompt_ids, max_tokens:
        The prompt (at least one token) and the most tokens to generate (at least 1).
    sampling:
        Greedy when None.
    stop_ids:
        Generation ends after one of these tokens (it is kept in ``tokens``).
    tokenizer:
        When given, ``text`` is the decoded output and ``on_text`` gets each piece as soon as it is whole.
    vocab_size:
        When given, prompt token ids are checked against it.

    Returns
    -------
    GenerationResult
        Tokens, text, why it stopped (``eos``, ``length``, or ``context`` when the KV cache is full) and timings.
    """
    prompt_ids = [int(t) for t in prompt_ids]
    if max_tokens < 1:
        raise XpucError("--max-tokens must be at least 1")
    if not prompt_ids:
        raise XpucError("the prompt is empty")
    if vocab_size is not None:
        bad = [t for t in prompt_ids if not 0 <= t < vocab_size]
        if bad:
            raise XpucError(f"token id {bad[0]} is outside the vocabulary (0..{vocab_size - 1})")
    if len(prompt_ids) >= session.max_context:
        raise XpucError(f"the prompt is {len(prompt_ids)} tokens; the context holds {session.max_context} "
                        "(--max-context)")
    sampler = Sampler(sampling or SamplingParams())
    stream = TextStream(tokenizer) if tokenizer is not None else None
    stops = set(stop_ids)
    session.reset()
    t0 = time.perf_counter()
    logits = session.prefill(prompt_ids)
    t1 = time.perf_counter()
    first = np.array(logits, copy=True)
    tokens: list[int] = []
    steps: list[float] = []
    reason = "length"
    while True:
        tok = sampler(logits)
        tokens.append(tok)
        if on_token:
            on_token(tok)
        if stream is not None and on_text is not None:
            piece = stream.push(tok)
            if piece:
                on_text(piece)
        if tok in stops:
            reason = "eos"
            break
        if len(tokens) >= max_tokens:
            break
        if session.position >= session.max_context:
            reason = "context"
            break
        s = time.perf_counter()
        logits = session.decode(tok)
        steps.append(time.perf_counter() - s)
    t2 = time.perf_counter()
    text = tokenizer.decode(tokens) if tokenizer is not None else ""
    pending = stream.rest() if stream is not None and on_text is not None else text
    return GenerationResult(prompt_ids, tokens, text, t1 - t0, t2 - t1, reason, first,
                            handoff=getattr(session, "last_handoff", None), step_seconds=steps,
                            pending_text=pending)
