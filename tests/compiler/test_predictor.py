"""The activation predictor's initialisation and training (numpy; no model needed)."""

import numpy as np

from xpuc.compiler.predictor import _init_from_gate, _top_svd, train_layer


def _anisotropic(n: int, d: int, rng: np.random.Generator) -> np.ndarray:
    """Inputs whose variance decays over a random basis (as hidden states of a trained model do)."""
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    return ((rng.standard_normal((n, d)) * (np.arange(1, d + 1) ** -1.0)) @ q.T).astype(np.float32)


def test_init_is_the_reduced_rank_regression_of_the_gate_preactivations():
    """Hidden units [Ax, -Ax] through ReLU and output [B, -B] give B A x = the projection of the gate
    pre-activations on their top-k right singular vectors: the best rank-k fit on the data (Eckart-Young),
    which beats the gate's own rank-k SVD on anisotropic inputs."""
    rng = np.random.default_rng(0)
    n, d, f, k = 400, 64, 96, 8
    x = _anisotropic(n, d, rng)
    gate = (rng.standard_normal((f, d)) / np.sqrt(d)).astype(np.float32)
    w1, w2 = _init_from_gate(gate, x, k)
    assert w1.shape == (2 * k, d) and w2.shape == (f, 2 * k)
    fit = np.maximum(x @ w1.T, 0) @ w2.T
    g = (x @ gate.T).astype(np.float64)
    _, _, vt = np.linalg.svd(g, full_matrices=False)
    np.testing.assert_allclose(fit, g @ vt[:k].T @ vt[:k], rtol=1e-3, atol=1e-4 * np.abs(g).max())
    # the hidden units have unit standard deviation over the data
    np.testing.assert_allclose((x @ w1[:k].T).std(0), 1.0, rtol=0.05)
    u, s, wt = _top_svd(gate, k)
    weight_svd = x @ (wt.T * s) @ u.T
    assert np.linalg.norm(fit - g) < 0.8 * np.linalg.norm(weight_svd - g)


def test_trained_predictor_keeps_the_recall_and_beats_chance():
    """Neurons that fire when their gate pre-activation crosses a per-neuron threshold, on low-rank inputs:
    the trained predictor keeps about the requested recall on its validation split and predicts far fewer
    neurons than a predictor that selects everything."""
    rng = np.random.default_rng(1)
    n, d, f = 1200, 64, 256
    x_all = _anisotropic(n + 400, d, rng)
    x, held = x_all[:n], x_all[n:]
    gate = (rng.standard_normal((f, d)) / np.sqrt(d)).astype(np.float32)
    g = x @ gate.T
    thr = np.quantile(g, 0.9, axis=0)
    lp, density = train_layer(x, g > thr, gate, 32, 0.95, seed=0)
    p = lp.predict(held)
    mh = (held @ gate.T) > thr
    recall = (p & mh).sum() / mh.sum()
    precision = (p & mh).sum() / p.sum()
    print(f"recall {recall:.3f} precision {precision:.3f} density {density:.3f}")
    assert recall > 0.85
    assert precision > 0.3  # chance (selecting everything) is 0.1
    assert density < 0.35


def test_init_keeps_the_rank_when_the_data_has_fewer_rows():
    """An MoE expert that few calibration tokens reach still gets a predictor of the requested rank (the
    compiled predict function has one shape per model): the gate's own SVD stands in for the data's."""
    rng = np.random.default_rng(2)
    gate = rng.standard_normal((48, 32)).astype(np.float32)
    w1, w2 = _init_from_gate(gate, _anisotropic(5, 32, rng), 8)
    assert w1.shape == (16, 32) and w2.shape == (48, 16)
    u, s, vt = np.linalg.svd(gate.astype(np.float64), full_matrices=False)
    x = rng.standard_normal((10, 32)).astype(np.float32)
    want = x @ (vt[:8].T * s[:8]) @ u[:, :8].T  # randomized SVD: close to, not exactly, the top 8 triplets
    np.testing.assert_allclose(np.maximum(x @ w1.T, 0) @ w2.T, want, atol=0.03 * np.abs(want).max())
