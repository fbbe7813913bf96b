"""Greedy agreement with llama.cpp on the same GGUF (needs llama-cpp-python: pip install 'xpuc[peer]')."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.peer

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain what a compiler does in one paragraph.",
    "List three uses of a hash table.",
    "Why is the sky blue?",
]


def test_first_32_greedy_tokens_match_llama_cpp(smollm2_path, smollm2_engine):
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(model_path=str(smollm2_path), n_ctx=512, n_threads=2, verbose=False)
    identical = 0
    for p in PROMPTS:
        ids = smollm2_engine.encode_prompt(p, chat=True)
        # same prompt tokens as llama.cpp's own tokenizer produces
        text = smollm2_engine.tokenizer.apply_chat_template(p)
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == ids
        ours = smollm2_engine.generate_ids(ids, 32, stop_ids=[]).tokens
        theirs = []
        for tok in llm.generate(ids, temp=0.0, top_k=1, reset=True):
            theirs.append(int(tok))
            if len(theirs) == 32:
                break
        identical += ours == theirs
    assert identical >= 4, f"only {identical}/5 prompts identical for 32 greedy tokens"
