"""Mixture-of-experts models offloaded: a generated Mixtral-format dReLU MoE (8 experts, top-2) profiled,
predicted, planned and packed per expert, decoded in every mode under a budget far below its FFN size."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from support.cli import assert_clean_error, xpuc

from xpuc.compiler.reference import ReferenceModel, ffn, route_tokens

PROMPT = [5, 77, 300, 12, 9, 401, 33, 2]


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    from support.models import profile_predict_plan

    from xpuc.compiler.offload_pack import pack_offload
    from xpuc.compiler.synth import synthesize_moe

    d = tmp_path_factory.mktemp("moe")
    synthesize_moe("tiny-moe", 0.88, 3, d / "model")
    spec, _, _ = profile_predict_plan(d, 1024, "oneplus-12", 3 << 20, "float16", 16)
    pack_offload(str(d / "model"), str(d / "stats.json"), str(d / "plan.json"), str(d / "pred.safetensors"),
                 d / "art", quiet=True)
    return d, spec


def test_frontend_reads_experts_and_routers(moe):
    _, spec = moe
    c = spec.config
    assert (c.num_experts, c.experts_per_token, c.ffn_units) == (8, 2, 16)
    assert spec.weights["layers.1.router"].shape == (8, c.hidden_size)
    assert spec.weights["layers.1.experts.7.down_proj"].shape == (c.hidden_size, c.intermediate_size)
    assert c.ffn_prefix(11) == "layers.1.experts.3." and c.unit_layer(11) == 1
    assert c.to_dict()["num_experts"] == 8
    dense = dataclasses.replace(c, num_experts=0, experts_per_token=0)
    assert "num_experts" not in dense.to_dict()  # dense models keep their fingerprints
    assert dense.ffn_prefix(1) == "layers.1." and dense.ffn_units == 2


def test_routing_is_mixtrals():
    """Softmax over all experts, top-k, renormalised — computed here the long way."""
    rng = np.random.default_rng(0)
    x, router = rng.standard_normal((6, 16)).astype(np.float32), rng.standard_normal((8, 16)).astype(np.float32)
    top, w = route_tokens(x, router, 2)
    logits = x @ router.T
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    want_top = np.argsort(-p, axis=1)[:, :2]
    np.testing.assert_array_equal(top, want_top)
    sel = np.take_along_axis(p, want_top, 1)
    np.testing.assert_allclose(w, sel / sel.sum(1, keepdims=True), rtol=1e-6)


def test_profile_is_per_expert(moe):
    from xpuc.runtime.formats.profile_stats import ProfileStats

    d, spec = moe
    stats = ProfileStats.load(d / "stats.json")
    freq = np.asarray(stats.frequency)
    assert freq.shape == (16, spec.config.intermediate_size)
    # an expert's neurons fire only for the tokens routed to it: top-2 of 8 bounds a layer's share by 2/8
    for layer in range(2):
        assert freq[layer * 8:(layer + 1) * 8].sum(0).max() <= 2.0 + 1e-6
    assert float(freq.mean()) < 0.05


class _MaskedMoE(ReferenceModel):
    """Numpy oracle of the sparse modes: each routed expert over the clusters the predictor selects."""

    def __init__(self, spec, model) -> None:
        super().__init__(spec, "float16")
        self.model = model

    def unit_ffn(self, u, x):
        keep = np.isin(self.model._cluster_of[u], self.model._predict(u, x[0].astype(np.float32)))
        p = self.config.ffn_prefix(u)
        return ffn(x, self.w[p + "gate_proj"][keep], self.w[p + "up_proj"][keep], self.w[p + "down_proj"][:, keep],
                   self.config.ffn_kind)


@pytest.mark.parametrize("mode", ["naive", "llmflash", "cache", "full"])
def test_moe_modes_match_numpy_under_a_quarter_of_the_ffn(moe, mode):
    from xpuc.runtime.offload import OffloadModel

    d, spec = moe
    with OffloadModel(d / "art", mode, ffn_fraction=0.25, threads=2) as m:
        ref = ReferenceModel(spec, "float16") if mode == "naive" else _MaskedMoE(spec, m)
        for t in PROMPT:
            want = ref.forward([t])[0]
            np.testing.assert_allclose(m.decode(t), want, rtol=2e-3, atol=2e-3 * np.abs(want).max())
        fl = m.flash
        total = len(fl.layers) * fl.n_clusters * fl.cluster_bytes
        assert len(fl.layers) == 16  # one flash region per expert
        if mode != "naive":
            assert m.accounted_bytes()["ffn"] <= 0.25 * total + 4096
            assert 0 < m.cache.hit_rate() < 1
        # a token reads at most its two routed experts per layer, never the other six
        per_token = m.reader.metrics()["bytes_read"] / len(PROMPT)
        assert per_token <= 2 * 2 * fl.n_clusters * fl.cluster_bytes + 1


def test_moe_oracle_mask_equals_dense_and_prefill_matches(moe):
    from xpuc.runtime.offload import OffloadModel

    d, spec = moe
    ref = ReferenceModel(spec, "float16")
    want = ref.forward(PROMPT)[-1]
    with OffloadModel(d / "art", "full", 0.2) as m:
        np.testing.assert_allclose(m.prefill_dense(PROMPT), want, rtol=2e-3, atol=2e-3 * np.abs(want).max())

        def oracle(u, x):
            p = spec.config.ffn_prefix(u)
            g, up = ref.w[p + "gate_proj"] @ x, ref.w[p + "up_proj"] @ x
            return np.unique(m._cluster_of[u][(g > 0) & (up > 0)]).astype(np.int32)

        m.cluster_selector = oracle
        for t in [11, 250, 3]:
            w = ref.forward([t])[0]
            np.testing.assert_allclose(m.decode(t), w, rtol=2e-3, atol=2e-3 * np.abs(w).max())


def test_moe_cli_run_and_compile_refusal(moe, tmp_path):
    d, _ = moe
    r = xpuc("run", str(d / "art"), "--prompt", "hello", "--mode", "full", "--budget", "20%", "--max-tokens", "4")
    assert r.returncode == 0, r.stderr
    assert_clean_error(xpuc("compile", str(d / "model"), "-o", str(tmp_path / "c")), "mixture-of-experts")
    assert not (tmp_path / "c").exists()


def test_inspect_packed_moe(moe):
    import json

    r = xpuc("inspect", str(moe[0] / "art"), "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["experts"] == 8 and info["experts_per_token"] == 2
    assert len(info["hot_clusters_per_expert"]) == 16 and len(info["predictor_ranks"]) == 16
