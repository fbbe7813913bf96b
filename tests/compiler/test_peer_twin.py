"""The llama.cpp twin of a streamed GGUF (needs llama-cpp-python: pip install 'xpuc[peer]'): llama.cpp reads the
file xpuc generated as the SwiGLU model over the same weights. Its logits equal the numpy reference's over
the same file with the FFN computed as SwiGLU, up to llama.cpp's 8-bit activation quantization — so the twin
is the same model (rope row order, norms, experts and router included), and only the activation differs."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from xpuc.compiler.frontends import load_model
from xpuc.compiler.reference import ReferenceModel
from xpuc.compiler.synth_stream import synthesize_gguf

pytestmark = pytest.mark.peer


@pytest.mark.parametrize("shape", ["tiny", "tiny-moe"])
def test_llamacpp_runs_the_twin_as_swiglu_over_the_same_weights(tmp_path, shape):
    llama_cpp = pytest.importorskip("llama_cpp")
    path = tmp_path / "m.gguf"
    synthesize_gguf(shape, 0.9, 4, path, calib_tokens=64)
    spec = load_model(str(path))
    assert spec.config.ffn_kind == "drelu"
    swiglu = dataclasses.replace(spec, config=dataclasses.replace(spec.config, ffn_kind="swiglu"))
    ids = [5, 17, 99, 3, 250, 41, 8, 77]
    want = ReferenceModel(swiglu).forward(ids)
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, n_threads=2, logits_all=True, verbose=False)
    assert llm.n_vocab() == spec.config.vocab_size
    llm.eval(ids)
    got = np.array(llm.scores[: len(ids)], np.float32)
    for g, w in zip(got, want, strict=True):
        assert np.corrcoef(g, w)[0, 1] > 0.99
    assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.75
    drelu = ReferenceModel(spec).forward(ids)  # the dReLU model xpuc runs is another function of the same bytes
    assert np.corrcoef(drelu[-1], want[-1])[0, 1] < 0.99
