"""Random weight matrices with the structure of a trained model's, for the generated models (:mod:`synth`).

Measured on the real models that can be had here (``benchmarks/activation_realism.py``), trained weights differ
from i.i.d. Gaussian ones in two ways that matter for activation sparsity and its predictors:

* the hidden states are **anisotropic**: a few directions carry most of their variance;
* the gate matrices have a **decaying singular-value spectrum**: a few directions of the input decide most of
  the gate pre-activations.

:func:`decaying_matrix` draws a matrix with a power-law spectrum (random singular vectors); its Frobenius norm
equals that of the i.i.d. matrix it replaces, so the model's scales are unchanged.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np


def power_spectrum(k: int, decay: float) -> np.ndarray:
    """``(1 + j / 8) ** -decay`` for ``j < k``, normalised to unit mean square (a flat spectrum for ``decay = 0``)."""
    s = (1.0 + np.arange(k) / 8.0) ** -float(decay)
    return s / np.sqrt(np.mean(s * s))


def random_basis(n: int, rng: np.random.Generator) -> np.ndarray:
    """A random (n, n) orthogonal matrix (QR of a Gaussian one, signs fixed so that it is Haar-distributed)."""
    q, r = np.linalg.qr(rng.standard_normal((n, n)).astype(np.float32))
    return (q * np.sign(np.diag(r))[None]).astype(np.float32)


def decaying_matrix(rows: int, cols: int, std: float, decay: float, rng: np.random.Generator,
                    basis: np.ndarray | None = None) -> np.ndarray:
    """A (rows, cols) float32 matrix whose columns, in the orthogonal ``basis`` (cols, cols; random if not
    given), have standard deviations ``std * power_spectrum(cols, decay)``.

    For ``rows >= cols`` its singular values follow that spectrum closely (the scaled Gaussian columns are
    nearly orthogonal); ``decay = 0`` gives an i.i.d. ``N(0, std²)`` matrix in distribution. The mean square
    of the entries is ``std²`` for any decay.
    """
    scales = (std * power_spectrum(cols, decay)).astype(np.float32)
    z = rng.standard_normal((rows, cols)).astype(np.float32) * scales[None]
    q = basis if basis is not None else random_basis(cols, rng)
    return z @ q.T


@dataclass(frozen=True)
class WeightStructure:
    """How a generated model's weights depart from i.i.d. Gaussian ones.

    The defaults make a 4-layer model of the ``small`` shape reproduce the activation statistics measured on
    SmolLM2-135M (``benchmarks/activation_realism.py``; README, "How real are the generated models"):
    hidden-state anisotropy, gate spectrum, predictability of the gate pre-activations, firing-frequency
    spread, overlap of consecutive tokens' active sets and a rank-64 predictor's precision.
    """

    embed_decay: float = 1.0  # power-law decay of the embeddings' spectrum: anisotropic hidden states
    gate_decay: float = 0.15  # ... of the gate matrices' spectrum
    qk_gain: float = 4.0  # query/key scale: content-based attention, so that an FFN input depends on the
    #                        context and not only on its token (a byte-level text has ~100 distinct tokens)
    attn_out_gain: float = 1.5  # scale of the attention output in the residual stream
    bias_scale: float = 0.5  # the bias channel holds bias_scale * sqrt(d)

    def to_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)


TRAINED_LIKE = WeightStructure()
IID = WeightStructure(0.0, 0.0, 1.0, 0.3, 1.0)  # the earlier generator: i.i.d. Gaussian matrices
