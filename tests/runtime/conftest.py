"""The packed model the offloading tests share (built once per test process)."""

from __future__ import annotations

import pytest

from xpuc.compiler.synth import synthesize


@pytest.fixture(scope="session", params=[16, 2, 1], ids=["C16-aligned", "C2-unaligned", "C1-split"])
def packed(tmp_path_factory, request):
    """A tiny generated dReLU model, profiled, with a predictor, planned and packed (fp16; clusters of 16:
    12 KiB records, read in place; clusters of 2: 1.5 KiB records, read through aligned spans)."""
    from support.models import profile_predict_plan

    from xpuc.compiler.offload_pack import pack_offload

    d = tmp_path_factory.mktemp("offload")
    synthesize("tiny", 0.9, 3, d / "model")
    spec, _, _ = profile_predict_plan(d, 1024, "oneplus-12", 4 << 20, "float16", request.param)
    pack_offload(str(d / "model"), str(d / "stats.json"), str(d / "plan.json"), str(d / "pred.safetensors"),
                 d / "art", quiet=True)
    return d, spec
