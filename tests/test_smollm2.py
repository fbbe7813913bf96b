"""The real bundled model: compiled Relax path vs the numpy reference (logits of a 64-token prompt, greedy)."""

from __future__ import annotations

import numpy as np
import pytest

PROMPT = ("The history of computing is a story of machines that grew smaller and faster. Early computers "
          "filled whole rooms, consumed enormous amounts of power and were programmed by rewiring panels. "
          "Later, transistors and integrated circuits made it possible to put a processor in every pocket, "
          "and today a phone carries more memory than the machines that once guided spacecraft to the moon. "
          "Compilers translate programs written by people into instructions for these processors.")


@pytest.fixture(scope="module")
def compiled(smollm2_engine):
    return smollm2_engine


@pytest.fixture(scope="module")
def reference(smollm2_path):
    from xpuc.compiler.frontends import load_model
    from xpuc.compiler.reference import ReferenceModel

    return ReferenceModel(load_model(smollm2_path, with_tokenizer=False), weight_dtype="float16")


def test_logits_of_64_token_prompt(compiled, reference):
    ids = compiled.tokenizer.encode(PROMPT)[:64]
    assert len(ids) == 64
    compiled.session.reset()
    got = compiled.session.prefill(ids)
    reference.reset()
    want = reference.forward(ids)[-1]
    rel = np.abs(got - want).max() / np.abs(want).max()
    assert rel <= 1e-2, rel
    # and one decode step on top
    tok = int(np.argmax(want))
    got, want = compiled.session.decode(tok), reference.forward([tok])[-1]
    assert np.abs(got - want).max() / np.abs(want).max() <= 1e-2


def test_greedy_tokens_match_reference(compiled, reference):
    ids = compiled.encode_prompt("Name three primary colors.", chat=True)
    res = compiled.generate_ids(ids, 16)
    want = reference.generate_greedy(ids, 16, compiled.tokenizer.eos_token_ids)
    assert res.tokens == want
    assert res.text.strip()
