"""Activation statistics (compiler/activation_stats.py): each measure on constructed cases with known answers,
and the whole measurement on a generated model (trained-like weights versus i.i.d. ones)."""

import numpy as np
import pytest

from xpuc.compiler.activation_stats import (
    compare_table,
    consecutive_overlap,
    frequency_shares,
    gate_singular_values,
    measure_activations,
    top_energy,
    variance_in_top,
)
from xpuc.compiler.synth_weights import decaying_matrix, power_spectrum
from xpuc.runtime.errors import XpucError


def test_top_energy_of_flat_and_peaked_spectra():
    assert top_energy(np.ones(100)) == pytest.approx(0.10)
    assert top_energy(np.r_[10.0, np.zeros(99)]) == pytest.approx(1.0)
    assert top_energy(np.r_[np.full(10, 3.0), np.ones(90)]) == pytest.approx(90 / 180)


def test_variance_in_top_finds_the_principal_directions():
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.standard_normal((8, 8)))
    x = (rng.standard_normal((4000, 8)) * np.r_[3.0, 2.0, np.full(6, 0.5)]) @ q.T + 5.0  # the mean is removed
    want = (9 + 4) / (9 + 4 + 6 * 0.25)
    assert variance_in_top(x, 2) == pytest.approx(want, abs=0.02)
    assert variance_in_top(x, 8) == pytest.approx(1.0)


def test_gate_singular_values_match_numpy():
    a = np.random.default_rng(1).standard_normal((40, 12)).astype(np.float32)
    np.testing.assert_allclose(gate_singular_values(a), np.linalg.svd(a, compute_uv=False), rtol=1e-4)
    np.testing.assert_allclose(gate_singular_values(a.T), np.linalg.svd(a, compute_uv=False), rtol=1e-4)


def test_decaying_matrix_has_the_requested_spectrum_and_scale():
    rng = np.random.default_rng(2)
    m = decaying_matrix(4000, 64, 0.1, 1.0, rng)
    s = np.linalg.svd(m, compute_uv=False)
    want = 0.1 * power_spectrum(64, 1.0) * np.sqrt(4000)
    np.testing.assert_allclose(s, want, rtol=0.1)
    assert np.sqrt(np.mean(m * m)) == pytest.approx(0.1, rel=0.02)
    flat = decaying_matrix(4000, 64, 0.1, 0.0, rng)
    assert top_energy(np.linalg.svd(flat, compute_uv=False)) < 0.12 < top_energy(s)


def test_overlap_and_frequency_shares_on_constructed_masks():
    same = np.tile([True, False, True, False], (5, 1))
    assert consecutive_overlap(same) == pytest.approx(1.0)
    alternating = np.array([[1, 1, 0, 0], [0, 0, 1, 1]] * 3, bool)
    assert consecutive_overlap(alternating) == pytest.approx(0.0)
    half = np.array([[1, 1, 0, 0], [0, 1, 1, 0]], bool)  # {0,1} then {1,2}: 1 of 3
    assert consecutive_overlap(half) == pytest.approx(1 / 3)
    m = np.zeros((10, 20), bool)
    m[:, 0] = m[:, 1] = True  # two neurons always fire
    m[0, 2:6] = True  # four fire once; the other 14 never
    hot, dead = frequency_shares(m)
    assert hot == pytest.approx(20 / 24) and dead == pytest.approx(14 / 20)


def test_measure_on_generated_models_shows_the_trained_like_structure(tmp_path):
    """The trained-like generator's gates have a decaying spectrum and its hidden states are anisotropic, which
    the i.i.d. one's are not (its few distinct inputs make them degenerate: almost all variance in a few
    directions); both hit the sparsity they were calibrated for."""
    from xpuc.compiler.frontends import load_model
    from xpuc.compiler.synth import synthesize
    from xpuc.compiler.synth_weights import IID
    from xpuc.runtime.tokenizer import XpucTokenizer

    text = open("/usr/share/common-licenses/Apache-2.0").read()
    got = {}
    for name, st in (("trained-like", None), ("iid", IID)):
        synthesize("tiny", 0.9, 0, tmp_path / name, **({"structure": st, "alpha": 1.0} if st else {}))
        spec = load_model(str(tmp_path / name))
        ids = XpucTokenizer.from_source(spec.tokenizer).encode(text)[:512]
        got[name] = measure_activations(spec, ids, rank=16, name=name)
    real, iid = got["trained-like"].means(), got["iid"].means()
    assert real["gate_top_energy"] > iid["gate_top_energy"] + 0.1
    assert real["input_top_energy"] < iid["input_top_energy"] - 0.1
    for s in (real, iid):
        assert 0.85 < s["sparsity"] < 0.95 and 0.0 < s["precision"] <= 1.0 and s["recall"] > 0.8
    table = compare_table(list(got.values()))
    assert "| gate_top_energy |" in table and "trained-like" in table and table.count("\n") == 1 + len(real)
    with pytest.raises(XpucError, match="too few"):
        measure_activations(spec, ids[:10])
