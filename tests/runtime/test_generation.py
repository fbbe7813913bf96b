"""The one generation loop (runtime/generation.py) over the session protocol, and its text streaming."""

from __future__ import annotations

import numpy as np
import pytest

from xpuc.runtime.errors import XpucError
from xpuc.runtime.generation import TextStream, generate


class ScriptedSession:
    """A DecodeSession whose next token is always (last token + 1) mod vocab (greedy)."""

    def __init__(self, vocab: int = 50, max_context: int = 64) -> None:
        self.vocab, self.max_context = vocab, max_context
        self.position = 0
        self.calls: list[str] = []

    def _logits(self, last: int) -> np.ndarray:
        z = np.zeros(self.vocab, np.float32)
        z[(last + 1) % self.vocab] = 1.0
        return z

    def reset(self) -> None:
        self.position = 0
        self.calls.append("reset")

    def prefill(self, ids):
        self.position += len(ids)
        self.calls.append(f"prefill {len(ids)}")
        return self._logits(ids[-1])

    def decode(self, token: int):
        self.position += 1
        self.calls.append("decode")
        return self._logits(token)


def test_greedy_tokens_length_and_calls():
    s = ScriptedSession()
    res = generate(s, [3, 4], 5)
    assert res.tokens == [5, 6, 7, 8, 9] and res.stop_reason == "length"
    assert s.calls == ["reset", "prefill 2"] + ["decode"] * 4  # the first token comes from prefill's logits
    assert len(res.step_seconds) == 4 and res.prefill_s >= 0 and res.decode_tok_s > 0


def test_stop_token_ends_generation_and_is_kept():
    res = generate(ScriptedSession(), [3], 10, stop_ids=[6])
    assert res.tokens == [4, 5, 6] and res.stop_reason == "eos"


def test_full_context_stops_instead_of_failing():
    s = ScriptedSession(max_context=6)
    res = generate(s, [1, 2, 3], 10)
    assert res.stop_reason == "context" and s.position == 6 and len(res.tokens) == 4


@pytest.mark.parametrize("prompt, pattern", [([], "empty"), ([1, 99], "outside the vocabulary"),
                                             ([1] * 64, "context holds 64")])
def test_bad_prompts_are_refused_before_anything_runs(prompt, pattern):
    s = ScriptedSession()
    with pytest.raises(XpucError, match=pattern):
        generate(s, prompt, 4, vocab_size=50)
    assert s.calls == []


def test_text_stream_holds_back_a_partial_character():
    from support.models import tiny_tokenizer

    from xpuc.runtime.tokenizer import XpucTokenizer, tokenizer_json_from_gguf_vocab

    t = tiny_tokenizer()
    tok = XpucTokenizer(tokenizer_json_from_gguf_vocab(t["tokens"], t["merges"], t["token_types"], t["pre"]))
    ids = tok.encode("hé world")  # 'é' is two byte-level tokens
    stream = TextStream(tok)
    pieces = [stream.push(i) for i in ids]
    assert "".join(pieces) + stream.rest() == "hé world"
    assert "\ufffd" not in "".join(pieces) and "" in pieces  # the first byte of 'é' was held back


def test_streamed_pieces_and_pending_text_make_the_whole_text():
    from support.models import tiny_tokenizer

    from xpuc.runtime.tokenizer import XpucTokenizer, tokenizer_json_from_gguf_vocab

    t = tiny_tokenizer()
    tok = XpucTokenizer(tokenizer_json_from_gguf_vocab(t["tokens"], t["merges"], t["token_types"], t["pre"]))
    shown: list[str] = []
    res = generate(ScriptedSession(vocab=200), [70], 8, tokenizer=tok, on_text=shown.append)
    assert "".join(shown) + res.pending_text == res.text == tok.decode(res.tokens)
    quiet = generate(ScriptedSession(vocab=200), [70], 8, tokenizer=tok)
    assert quiet.pending_text == quiet.text == res.text
