"""Planner: valid plans for random statistics and budgets (hypothesis), optimality of the hot set,
explanations, and the profiler on a generated dReLU model."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xpuc.compiler.planner import fixed_bytes, plan_neurons
from xpuc.runtime.budget import parse_size
from xpuc.runtime.errors import XpucError
from xpuc.runtime.formats.arch import ArchConfig
from xpuc.runtime.formats.plan import Plan
from xpuc.runtime.formats.profile_stats import ProfileStats
from xpuc.targets.profile import load_profile

CFG = ArchConfig("mistral", 1000, 256, 512, 3, 4, 2, 64, 1e4, 1e-5, "drelu", False, False, 512)
PROFILES = {n: load_profile(n) for n in ("oneplus-12", "oneplus-ace2")}


def _stats(freq: np.ndarray, cfg: ArchConfig = CFG) -> ProfileStats:
    return ProfileStats(cfg.to_dict(), "0" * 16, 100, None, [0.0] * cfg.num_layers,
                        freq.tolist())


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), extra=st.floats(0.0, 1.5), dtype=st.sampled_from(["q4_0", "float16"]),
       device=st.sampled_from(sorted(PROFILES)), alpha=st.floats(0.3, 2.5))
def test_plans_are_valid(seed, extra, dtype, device, alpha):
    rng = np.random.default_rng(seed)
    freq = np.clip(rng.pareto(alpha, (CFG.num_layers, CFG.intermediate_size)) * 0.05, 0, 1)
    record = int(np.ceil(3 * CFG.hidden_size * {"q4_0": 18 / 32, "float16": 2}[dtype]))
    ffn_bytes = CFG.num_layers * CFG.intermediate_size * record
    minimum = fixed_bytes(CFG, dtype, 2048) + CFG.num_layers * 32 * record
    budget = int(minimum + extra * ffn_bytes)
    plan = plan_neurons(CFG, _stats(freq), PROFILES[device], budget, dtype)
    assert plan.total_bytes <= budget  # budget respected
    assert len(plan.hot_neurons) == CFG.num_layers
    for hot in plan.hot_neurons:  # every neuron placed once: hot ids unique and valid
        assert len(set(hot)) == len(hot) and all(0 <= i < CFG.intermediate_size for i in hot)
        cold = np.setdiff1d(np.arange(CFG.intermediate_size), hot)
        assert len(cold) + len(hot) == CFG.intermediate_size
    hot_f = [freq[i, j] for i, h in enumerate(plan.hot_neurons) for j in h]
    cold_f = [freq[i, j] for i in range(CFG.num_layers) for j in range(CFG.intermediate_size)
              if j not in set(plan.hot_neurons[i])]
    if hot_f and cold_f:  # optimality: no cold neuron is more frequent than a hot one
        assert min(hot_f) >= max(cold_f) - 1e-12
    assert 0.0 <= plan.expected_hit_rate <= 1.0 + 1e-9


def test_budget_too_small_states_the_minimum():
    freq = np.full((CFG.num_layers, CFG.intermediate_size), 0.1)
    with pytest.raises(XpucError, match=r"below the minimum of \d+ MiB"):
        plan_neurons(CFG, _stats(freq), PROFILES["oneplus-12"], 1024)


def test_stats_from_another_model_rejected():
    other = ArchConfig("mistral", 1000, 256, 512, 2, 4, 2, 64, 1e4, 1e-5, "drelu", False, False, 512)
    freq = np.full((other.num_layers, other.intermediate_size), 0.1)
    with pytest.raises(XpucError, match="another architecture config"):
        plan_neurons(CFG, _stats(freq, other), PROFILES["oneplus-12"], 2**30)
    with pytest.raises(XpucError, match="recorded on another model"):  # same config, other weights
        plan_neurons(CFG, _stats(np.full((CFG.num_layers, CFG.intermediate_size), 0.1)), PROFILES["oneplus-12"],
                     2**30, fingerprint="1" * 16)


def test_plan_roundtrip_and_explain(tmp_path):
    freq = np.random.default_rng(0).random((CFG.num_layers, CFG.intermediate_size)) * 0.2
    plan = plan_neurons(CFG, _stats(freq), PROFILES["oneplus-12"], parse_size("64MiB"))
    path = plan.save(tmp_path / "plan.json")
    again = Plan.load(path)
    assert again == plan
    text = plan.explain()
    for word in ("hot segment", "cold cache", "flash reads", "queue depth", "KiB/token"):
        assert word in text
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(XpucError, match="not a readable xpuc plan"):
        Plan.load(tmp_path / "bad.json")


def test_parse_size():
    assert parse_size("4GiB") == 4 * 2**30 and parse_size("512MiB") == 512 * 2**20 and parse_size("1000") == 1000
    with pytest.raises(XpucError):
        parse_size("lots")


def test_profiler_on_generated_model(tmp_path):
    from xpuc.compiler.frontends import load_model
    from xpuc.compiler.profiler import profile_model
    from xpuc.compiler.synth import synthesize

    rep = synthesize("tiny", 0.9, 2, tmp_path / "m")
    spec = load_model(tmp_path / "m")
    ids = list(np.random.default_rng(5).integers(0, spec.config.vocab_size, 300))
    stats = profile_model(spec, ids)
    assert all(abs(s - 0.9) < 0.03 for s in stats.sparsity), (stats.sparsity, rep.measured_sparsity)
    stats.save(tmp_path / "stats.json")
    assert ProfileStats.load(tmp_path / "stats.json").frequency == stats.frequency
    plan = plan_neurons(spec.config, stats, PROFILES["oneplus-12"], parse_size("8MiB"), "float16", cluster=8)
    assert plan.expected_hit_rate > 0


def test_cli_profile_and_plan(tmp_path):
    from support.cli import assert_clean_error, xpuc

    from xpuc.compiler.synth import synthesize

    synthesize("tiny", 0.9, 4, tmp_path / "m")
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 20)
    r = xpuc("profile", str(tmp_path / "m"), "--text", str(text), "-o", str(tmp_path / "s.json"))
    assert r.returncode == 0, r.stderr
    r = xpuc("plan", str(tmp_path / "m"), "--stats", str(tmp_path / "s.json"), "--memory-budget", "64MiB",
             "-o", str(tmp_path / "p.json"))
    assert r.returncode == 0 and "hot segment" in r.stdout, r.stderr
    assert_clean_error(xpuc("profile", str(tmp_path / "m"), "--text", str(tmp_path / "nope.txt")), "no such text file")
    (tmp_path / "empty.txt").write_text("  \n")
    assert_clean_error(xpuc("profile", str(tmp_path / "m"), "--text", str(tmp_path / "empty.txt")), "empty text file")
    assert_clean_error(xpuc("plan", str(tmp_path / "m"), "--stats", str(tmp_path / "s.json"), "--memory-budget",
                            "1KiB"), "below the minimum")
    (tmp_path / "bad.json").write_text("{")
    assert_clean_error(xpuc("plan", str(tmp_path / "m"), "--stats", str(tmp_path / "bad.json"), "--memory-budget",
                            "1GiB"), "not a readable xpuc profile")
