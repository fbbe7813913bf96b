"""A packed model's linux-arm64 twin runs end to end under QEMU user mode and decodes the host build's tokens.

For a generated dReLU model and a generated Mixtral-format MoE: profile, predictor and plan once, then ``xpuc
pack`` twice -- for this host and for ``linux-arm64`` (the Armv8.2-A twin of a phone's little core, cross-linked
with the aarch64 GNU toolchain). The twin is loaded by the emulated arm64 Python with TVM's runtime library only,
verified like ``xpuc run`` verifies it, and decodes greedily with half of its FFN on flash (``full`` mode: the
neuron cache, the predictor and the flash reads, its batch-read helper cross-compiled for aarch64).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

PROMPT = [5, 77, 300, 12, 9, 401]
TOKENS = 8

pytestmark = [pytest.mark.arm, pytest.mark.slow]  # packs two models for aarch64 and runs them under QEMU


def _require_emulation() -> None:
    from xpuc.targets.qemu import missing_host_tools

    missing = missing_host_tools()
    if missing:
        pytest.skip(f"needs {', '.join(missing)}")


@pytest.mark.parametrize("shape", ["tiny", "tiny-moe"])
def test_packed_twin_under_qemu_decodes_the_host_tokens(tmp_path, shape, monkeypatch):
    _require_emulation()
    from support.models import profile_predict_plan

    from xpuc.compiler.offload_pack import pack_offload
    from xpuc.compiler.synth import synthesize, synthesize_moe
    from xpuc.runtime.generation import generate
    from xpuc.runtime.offload import OffloadModel
    from xpuc.schedules.sparse_ffn import int8_dot_available
    from xpuc.targets.arm_build import inspect_elf
    from xpuc.targets.profile import load_profile
    from xpuc.targets.qemu import run_aarch64, xpuc_package

    (synthesize if shape == "tiny" else synthesize_moe)(shape, 0.9, 5, tmp_path / "model")
    profile_predict_plan(tmp_path, 1024, "linux-arm64", 4 << 20, "q4_0", 16)
    parts = [str(tmp_path / n) for n in ("stats.json", "plan.json", "pred.safetensors")]
    # the default, int8 dot products, where this host has them too (VNNI; the twin: sdot); else float32 on both
    dot = "int8" if int8_dot_available(load_profile("host").cpu_target()) else "float32"
    for device in ("host", "linux-arm64"):
        pack_offload(str(tmp_path / "model"), *parts, tmp_path / device, device=device, quiet=True, dot=dot)
        info = json.loads((tmp_path / device / "manifest.json").read_text())["modules"][1]["info"]
        assert info["dot"] == dot
    for lib in ("decode.so", "ffn.so"):
        assert inspect_elf(tmp_path / "linux-arm64" / lib).machine == "AArch64"

    with OffloadModel(tmp_path / "host", "full", 0.5, context=256) as m:
        want = generate(m, PROMPT, TOKENS, vocab_size=m.config.vocab_size)
        assert sum(t.bytes_read for t in m.token_metrics) > 0  # half of the FFN really is on flash

    np.save(tmp_path / "ids.npy", np.array(PROMPT, np.int32))
    cache = tmp_path / "cache"  # the batch-read helper is built for aarch64 by the cross compiler
    monkeypatch.setenv("XPUC_CACHE", str(cache))
    monkeypatch.setenv("CC", shutil.which("aarch64-linux-gnu-gcc") or "")

    runner = str(Path(__file__).parents[1] / "support" / "arm_offload_runner.py")
    r = run_aarch64(runner, [str(tmp_path / "linux-arm64"), "full", "0.5", str(tmp_path / "ids.npy"), str(TOKENS),
                             str(tmp_path / "out.npz")], extra_path=[xpuc_package(tmp_path / "pkg")], timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    out = np.load(tmp_path / "out.npz")
    assert str(out["machine"]) == "aarch64" and bool(out["native_reader"]) and int(out["bytes_read"]) > 0
    assert out["tokens"].tolist() == want.tokens
    np.testing.assert_allclose(out["first_logits"], want.first_logits, rtol=2e-3,
                               atol=2e-3 * np.abs(want.first_logits).max())
