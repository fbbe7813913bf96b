"""Models streamed layer by layer into GGUF (compiler/synth_stream.py): what the generator carried equals the
reference over the file, an interrupted run resumes to the same bytes, the MoE layout reads back per expert,
and bad runs fail cleanly."""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pytest
from support.cli import assert_clean_error, xpuc

from xpuc.compiler.frontends import load_model
from xpuc.compiler.reference import ReferenceModel
from xpuc.compiler.synth_stream import synthesize_gguf
from xpuc.runtime.errors import XpucError


def _sha(p) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


class _Stop(Exception):
    pass


def _interrupt_after(layers: int):
    def progress(i, n):
        if i == layers:
            raise _Stop

    return progress


def test_interrupted_run_resumes_to_the_same_bytes_and_carried_the_reference_hidden_states(tmp_path):
    whole = tmp_path / "whole.gguf"
    rep = synthesize_gguf("tiny", 0.9, 5, whole, layers=3, calib_tokens=64)
    assert all(abs(s - 0.9) < 0.03 for s in rep.measured_sparsity), rep.measured_sparsity
    assert json.loads((tmp_path / "whole.gguf.synth.json").read_text())["measured_sparsity"] == rep.measured_sparsity

    out = tmp_path / "resumed.gguf"
    with pytest.raises(_Stop):
        synthesize_gguf("tiny", 0.9, 5, out, layers=3, calib_tokens=64, progress=_interrupt_after(1))
    assert not out.exists() and (tmp_path / "resumed.gguf.partial").is_file()
    with np.load(tmp_path / "resumed.gguf.partial.state.npz") as z:
        assert int(z["layer"]) == 1
        h_held = z["h_held"]
    said: list[str] = []
    again = synthesize_gguf("tiny", 0.9, 5, out, layers=3, calib_tokens=64, notify=said.append)
    assert said == [f"resuming the interrupted run in {out}.partial at layer 1 of 3"]
    assert _sha(out) == _sha(whole) and again.measured_sparsity == rep.measured_sparsity
    assert not (tmp_path / "resumed.gguf.partial").exists()
    assert not (tmp_path / "resumed.gguf.partial.state.npz").exists()

    # the generator's held-out hidden states after layer 0 are the reference's over the file it wrote
    spec = load_model(str(out))
    assert spec.config.ffn_kind == "drelu" and spec.config.num_layers == 3 and spec.tokenizer is not None
    ids = np.random.default_rng([5, 0]).integers(0, spec.config.vocab_size, (2, 64))[1]
    ref = ReferenceModel(spec)
    h = ref.layer(0, ref.w["embed_tokens"][ids], np.arange(64))
    np.testing.assert_allclose(h_held, h, rtol=1e-4, atol=1e-4 * np.abs(h).max())


def test_a_run_with_other_arguments_starts_over(tmp_path):
    out = tmp_path / "m.gguf"
    with pytest.raises(_Stop):
        synthesize_gguf("tiny", 0.9, 1, out, layers=2, calib_tokens=32, progress=_interrupt_after(1))
    said: list[str] = []
    synthesize_gguf("tiny", 0.9, 2, out, layers=2, calib_tokens=32, notify=said.append)  # another seed
    assert len(said) == 1 and "starting over" in said[0]
    fresh = tmp_path / "fresh.gguf"
    synthesize_gguf("tiny", 0.9, 2, fresh, layers=2, calib_tokens=32)
    assert _sha(out) == _sha(fresh)


def test_a_damaged_checkpoint_starts_over(tmp_path):
    out = tmp_path / "m.gguf"
    with pytest.raises(_Stop):
        synthesize_gguf("tiny", 0.9, 1, out, layers=2, calib_tokens=32, progress=_interrupt_after(1))
    (tmp_path / "m.gguf.partial.state.npz").write_bytes(b"PK\x03\x04 not a zip file")
    said: list[str] = []
    synthesize_gguf("tiny", 0.9, 1, out, layers=2, calib_tokens=32, notify=said.append)
    assert len(said) == 1 and "starting over" in said[0]
    fresh = tmp_path / "fresh.gguf"
    synthesize_gguf("tiny", 0.9, 1, fresh, layers=2, calib_tokens=32)
    assert _sha(out) == _sha(fresh)


def test_moe_experts_read_back_per_expert_and_route_like_the_generator(tmp_path):
    out = tmp_path / "moe.gguf"
    rep = synthesize_gguf("tiny-moe", 0.88, 3, out, calib_tokens=128)
    assert all(0.84 < s < 0.92 for s in rep.expert_sparsity), rep.expert_sparsity
    assert all(s > 0.95 for s in rep.layer_sparsity), rep.layer_sparsity
    assert all(0.05 < load < 0.6 for layer in rep.expert_load for load in layer), rep.expert_load  # balanced
    spec = load_model(str(out))
    c = spec.config
    assert (c.num_experts, c.experts_per_token, c.ffn_units) == (8, 2, 16)
    g3 = spec.weights["layers.1.experts.3.gate_proj"]
    assert g3.shape == (c.intermediate_size, c.hidden_size)
    assert not np.array_equal(g3, spec.weights["layers.1.experts.4.gate_proj"])
    assert spec.weights["layers.0.router"].shape == (8, c.hidden_size)
    logits = ReferenceModel(spec).forward([1, 2, 3, 4])
    assert logits.shape == (4, c.vocab_size) and np.isfinite(logits).all()


def test_disk_space_is_checked_first(tmp_path, monkeypatch):
    import xpuc.compiler.synth_stream as ss

    monkeypatch.setattr(ss.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(1 << 40, 1 << 40, 1 << 20))
    with pytest.raises(XpucError, match="not enough disk space"):
        synthesize_gguf("tiny", 0.9, 0, tmp_path / "m.gguf")
    assert list(tmp_path.iterdir()) == []


def test_cli_writes_gguf_and_refuses_bad_runs(tmp_path):
    r = xpuc("synth", "--shape", "tiny", "--layers", "1", "-o", str(tmp_path / "m.gguf"))
    assert r.returncode == 0, r.stderr
    assert "GGUF, Q4_0" in r.stdout and "measured sparsity" in r.stdout
    assert_clean_error(xpuc("synth", "--shape", "tiny", "-o", str(tmp_path / "m.gguf")), "exists")
    assert_clean_error(xpuc("synth", "--shape", "huge", "-o", str(tmp_path / "x.gguf")), "unknown shape")
    assert_clean_error(xpuc("synth", "--shape", "tiny", "-o", str(tmp_path / "no" / "x.gguf")), "no such directory")
    # a full-depth 7B shape as a Hugging Face directory is refused with the way out
    assert_clean_error(xpuc("synth", "--shape", "turbosparse-mistral-7b", "-o", str(tmp_path / "d")), ".gguf")
