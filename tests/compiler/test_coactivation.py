"""Co-activation layout: neurons that fire together are stored side by side, so their reads merge."""

from __future__ import annotations

import numpy as np
import pytest

from xpuc.compiler.coactivation import coactivation_order, runs_per_token
from xpuc.compiler.flash_layout import storage_order
from xpuc.runtime.errors import XpucError


def _grouped_masks(tokens: int, groups: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Masks where each token fires 3 random groups of ``size`` neurons; the neurons' ids are shuffled."""
    rng = np.random.default_rng(seed)
    perm = rng.permutation(groups * size)
    m = np.zeros((tokens, groups * size), bool)
    for t in range(tokens):
        for g in rng.choice(groups, 3, replace=False):
            m[t, perm[g * size:(g + 1) * size]] = True
    return m, perm


def test_planted_groups_are_stored_together():
    cal, perm = _grouped_masks(400, 16, 24, 0)
    held = np.zeros_like(cal)
    rng = np.random.default_rng(1)
    for t in range(100):  # held-out tokens, the same groups
        for g in rng.choice(16, 3, replace=False):
            held[t, perm[g * 24:(g + 1) * 24]] = True
    order = coactivation_order(cal, leaf=8)
    assert sorted(order) == list(range(16 * 24))
    runs, per_run = runs_per_token(held, order)
    shuffled, _ = runs_per_token(held, np.arange(16 * 24))
    assert runs <= 4.5 and shuffled > 3 * runs  # about one run per firing group, against many for the ids
    assert per_run >= 16


def test_neurons_that_never_fire_go_last():
    m = np.zeros((50, 10), bool)
    m[:, [2, 5, 7]] = True
    m[::2, 1] = True
    order = coactivation_order(m)
    assert sorted(order[:4]) == [1, 2, 5, 7] and sorted(order[4:]) == [0, 3, 4, 6, 8, 9]


def test_storage_order_keeps_hot_first_and_checks_the_profile():
    freq = np.array([0.1, 0.9, 0.5, 0.2, 0.8])
    assert storage_order([1, 4], freq) == [1, 4, 2, 3, 0]
    assert storage_order([1, 4], freq, [3, 1, 0, 4, 2]) == [1, 4, 3, 0, 2]
    with pytest.raises(XpucError, match="not a permutation"):
        storage_order([1], freq, [0, 1, 1, 2, 3])
