"""Activation sparsity of every projection: calibration hits the target share, zero sparsity is the dense
model, and the measured quality moves with the sparsity (numpy reference on a tiny model)."""

from __future__ import annotations

import numpy as np
import pytest

from xpuc.compiler.act_sparsity import (
    POINTS,
    ThresholdedReference,
    calibrate_thresholds,
    measure_act_sparsity,
)
from xpuc.compiler.frontends import load_model
from xpuc.compiler.reference import ReferenceModel
from xpuc.runtime.errors import XpucError


@pytest.fixture
def spec(tiny_gguf):
    return load_model(str(tiny_gguf[0]), with_tokenizer=False)


def _tokens(spec, n: int, seed: int) -> list[int]:
    return np.random.default_rng(seed).integers(0, spec.config.vocab_size, n).tolist()


def test_thresholds_give_the_target_share_on_the_calibration_text(spec):
    ids = _tokens(spec, 96, 0)
    t = calibrate_thresholds(spec, ids, 0.4, window=48)
    assert len(t) == spec.config.num_layers and all(set(layer) == set(POINTS) for layer in t)
    assert all(v > 0 for layer in t for v in layer.values())
    ref = ThresholdedReference(spec, t)
    ref.forward_windows([np.asarray(ids[:48]), np.asarray(ids[48:])])
    # on the text the thresholds were computed from, every projection keeps about 60 % of its inputs (the
    # thresholded model's inputs drift a little from the dense ones they were computed on)
    # per layer: each window's attention inputs (attn, o), then one FFN call over both windows (ffn, down)
    assert len(ref.kept) == spec.config.num_layers * (2 * 2 + 2)
    assert abs(np.mean(ref.kept) - 0.6) < 0.05


def test_zero_sparsity_is_the_dense_model(spec):
    ids = _tokens(spec, 40, 1)
    t = calibrate_thresholds(spec, ids, 0.0)
    dense = ReferenceModel(spec, "float16").forward(ids)
    np.testing.assert_array_equal(ThresholdedReference(spec, t).forward(ids), dense)
    q = measure_act_sparsity(spec, ids, t, window=20)
    assert q.top1_agreement == 1.0 and q.perplexity_sparse == q.perplexity_dense and q.computed_share == 1.0


def test_only_the_chosen_inputs_are_thresholded(spec):
    t = calibrate_thresholds(spec, _tokens(spec, 64, 5), 0.5, points=("down",))
    assert all(layer["down"] > 0 and layer["attn"] == layer["o"] == layer["ffn"] == -1.0 for layer in t)


def test_quality_falls_with_sparsity(spec):
    cal, held = _tokens(spec, 96, 2), _tokens(spec, 64, 3)
    reports = [measure_act_sparsity(spec, held, calibrate_thresholds(spec, cal, s), window=32) for s in (0.2, 0.8)]
    assert reports[0].top1_agreement > reports[1].top1_agreement
    assert reports[0].computed_share > reports[1].computed_share
    assert "projection inputs kept" in reports[1].summary()


def test_bad_sparsity_and_short_text_are_clean_errors(spec):
    with pytest.raises(XpucError, match="in \\[0, 1\\)"):
        calibrate_thresholds(spec, _tokens(spec, 40, 4), 1.0)
    with pytest.raises(XpucError, match="too short"):
        calibrate_thresholds(spec, [1, 2, 3], 0.5)
    with pytest.raises(XpucError, match="must be among"):
        calibrate_thresholds(spec, _tokens(spec, 40, 4), 0.5, points=("qkv",))
    with pytest.raises(XpucError, match="layers of thresholds"):
        ThresholdedReference(spec, [])
