"""`xpuc synth`: deterministic dReLU models with the requested activation sparsity, usable end to end."""

from __future__ import annotations

import hashlib
import json

import numpy as np
from support.cli import assert_clean_error, xpuc

from xpuc.compiler.synth import synthesize


def _digest(d) -> str:
    h = hashlib.sha256()
    for f in sorted(d.glob("*.safetensors")):
        h.update(f.read_bytes())
    return h.hexdigest()


def test_sparsity_determinism_and_structure(tmp_path):
    a = synthesize("tiny", 0.9, 7, tmp_path / "a")
    b = synthesize("tiny", 0.9, 7, tmp_path / "b")
    assert b.measured_sparsity == a.measured_sparsity
    c = synthesize("tiny", 0.8, 8, tmp_path / "c")
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b") != _digest(tmp_path / "c")
    assert all(abs(s - 0.9) < 0.02 for s in a.measured_sparsity), a.measured_sparsity
    assert all(abs(s - 0.8) < 0.02 for s in c.measured_sparsity), c.measured_sparsity
    # power law: the hottest 10 % of neurons carry far more than 10 % of the activations
    assert all(h > 0.3 for h in a.hot_share)
    rep = json.loads((tmp_path / "a" / "xpuc_synth.json").read_text())
    assert rep["target_sparsity"] == 0.9


def test_generated_model_compiles_and_matches_reference(tmp_path):
    import tvm

    from xpuc.compiler.frontends import load_model
    from xpuc.compiler.reference import ReferenceModel
    from xpuc.compiler.relax_model import export_model, param_arrays
    from xpuc.runtime.session import DecoderSession
    from xpuc.targets.profile import load_profile

    synthesize("tiny", 0.9, 1, tmp_path / "m")
    spec = load_model(tmp_path / "m")
    assert spec.config.ffn_kind == "drelu" and spec.tokenizer is not None
    target = load_profile("host").cpu_target()
    mod, params = export_model(spec.config, target)
    with target:
        ex = tvm.compile(mod, target=target)
    arrays = param_arrays(spec)
    sess = DecoderSession(ex, [tvm.runtime.tensor(arrays[n]) for n, _, _ in params], 128, 32)
    ids = list(range(3, 40))
    got = sess.prefill(ids)
    want = ReferenceModel(spec, "float16").forward(ids)[-1]
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3 * np.abs(want).max())


def test_cli(tmp_path):
    r = xpuc("synth", "--shape", "tiny", "--sparsity", "0.85", "-o", str(tmp_path / "m"))
    assert r.returncode == 0, r.stderr
    assert "measured sparsity" in r.stdout
    assert_clean_error(xpuc("synth", "--shape", "huge", "-o", str(tmp_path / "x")), "unknown shape 'huge'")
    assert_clean_error(xpuc("synth", "--sparsity", "1.5", "-o", str(tmp_path / "y")), "--sparsity")
    assert_clean_error(xpuc("synth", "-o", str(tmp_path / "m")), "already exists")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_moe_generator_sparsity_routing_and_format(tmp_path):
    from safetensors import safe_open

    from xpuc.compiler.synth import synthesize_moe

    a = synthesize_moe("tiny-moe", 0.88, 5, tmp_path / "a")
    b = synthesize_moe("tiny-moe", 0.88, 5, tmp_path / "b")
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")  # deterministic
    assert all(abs(s - 0.88) < 0.03 for s in a.expert_sparsity), a.expert_sparsity
    assert all(s > 0.96 for s in a.layer_sparsity), a.layer_sparsity  # ≈97 % with top-2 of 8
    assert all(abs(sum(load) - 2.0) < 1e-9 for load in a.expert_load)  # every token goes to two experts
    cfg = json.loads((tmp_path / "a" / "config.json").read_text())
    assert cfg["num_local_experts"] == 8 and cfg["num_experts_per_tok"] == 2
    with safe_open(str(tmp_path / "a" / "model.safetensors"), "numpy") as f:
        keys = set(f.keys())
    assert "model.layers.1.block_sparse_moe.experts.7.w2.weight" in keys
    assert "model.layers.0.block_sparse_moe.gate.weight" in keys
    assert not any(".mlp." in k for k in keys)
    assert b.layer_sparsity == a.layer_sparsity
    r = xpuc("compile", str(tmp_path / "a"), "-o", str(tmp_path / "art"))
    assert_clean_error(r, "mixture-of-experts")
    r = xpuc("synth", "--shape", "tiny-moe", "--sparsity", "0.9", "-o", str(tmp_path / "c"))
    assert r.returncode == 0 and "whole MoE layer" in r.stdout
