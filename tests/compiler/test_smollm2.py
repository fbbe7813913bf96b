"""The real bundled model: compiled Relax path vs the numpy reference (logits of a 64-token prompt, greedy)."""

from __future__ import annotations

import numpy as np
import pytest

PROMPT = ("The history of computing is a story of machines that grew smaller and faster. Early computers "
          "filled whole rooms, consumed enormous amounts of power and were programmed by rewiring panels. "
          "Later, transistors and integrated circuits made it possible to put a processor in every pocket, "
          "and today a phone carries more memory than the machines that once guided spacecraft to the moon. "
          "Compilers translate programs written by people into instructions for these processors.")

pytestmark = pytest.mark.slow  # compiles the whole real model


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


def test_quantized_build_keeps_the_gguf_blocks_and_matches_reference(smollm2_path, tmp_path):
    """--quantize q4_1: the GGUF's own Q4_1/Q8_0 bytes, thresholded decode = the numpy sparse reference."""
    import gguf

    from xpuc.compiler.build import compile_model
    from xpuc.compiler.frontends import load_model
    from xpuc.compiler.sparse_quality import SparseReference
    from xpuc.runtime.engine import Engine
    from xpuc.runtime.weights import iter_tensors
    from xpuc.schedules.linear_quant import quantize_rows

    spec = load_model(smollm2_path, with_tokenizer=False)
    thresholds = [0.02 + 0.001 * i for i in range(spec.config.num_layers)]
    stats = tmp_path / "profile.json"
    from xpuc.runtime.formats.profile_stats import ProfileStats

    ProfileStats(config=spec.config.to_dict(), fingerprint=spec.fingerprint(), tokens=0,
                 target_sparsity=0.1, thresholds=thresholds,
                 frequency=[[1.0] * spec.config.intermediate_size] * spec.config.num_layers).save(stats)
    art = compile_model(smollm2_path, tmp_path / "art", quiet=True, quantize="q4_1", ffn_stats=stats,
                        dot="float32")  # the reference multiplies float32 activations
    # byte-identical blocks: layer 0's down projection (no RoPE row permutation) and the Q8_0 embedding
    raw = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(smollm2_path).tensors
           if t.name in ("blk.0.ffn_down.weight", "token_embd.weight")}
    (_, down), (_, embed) = iter_tensors(art / "params.safetensors", ["layers.0.ffn.down_weight", "embed"])
    for stored, name in ((down, "blk.0.ffn_down.weight"), (embed, "token_embd.weight")):
        nr, nb, r, bb = stored.shape
        rows = stored.transpose(0, 2, 1, 3).reshape(nr * r, nb * bb)
        assert np.array_equal(rows, raw[name].reshape(rows.shape)), name
    assert np.array_equal(quantize_rows(spec.weights["layers.0.down_proj"], "q4_1"), raw["blk.0.ffn_down.weight"]
                          .reshape(spec.config.hidden_size, -1))
    eng = Engine(art, max_context=256)
    ref = SparseReference(spec, [0.0] * spec.config.num_layers, weight_dtype="float32")
    ids = eng.tokenizer.encode(PROMPT)[:32]
    got, want = eng.session.prefill(ids), ref.forward(ids)[-1]
    assert np.abs(got - want).max() / np.abs(want).max() <= 1e-3
    ref.thresholds = thresholds
    tok = int(np.argmax(want))
    for _ in range(3):
        got, want = eng.session.decode(tok), ref.forward([tok])[-1]
        assert np.abs(got - want).max() / np.abs(want).max() <= 1e-3
        tok = int(np.argmax(want))
    assert 0.0 < 1 - float(np.mean(ref.computed[-3 * spec.config.num_layers:])) < 0.5  # neurons were skipped
