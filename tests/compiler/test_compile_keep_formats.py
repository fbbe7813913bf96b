"""`xpuc compile --quantize keep`: a GGUF whose matrices use different block formats (as shipped Q4_K_M files
do) compiles with every matrix's blocks copied as the file stores them, and decodes like the numpy reference."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import tvm
from support.models import random_weights, spec_from, tiny_config
from test_quant_formats import random_rows

from xpuc.compiler.frontend_gguf import load_gguf
from xpuc.compiler.model_writer import write_gguf
from xpuc.compiler.reference import ReferenceModel
from xpuc.compiler.relax_model import export_model, param_arrays
from xpuc.compiler.weight_formats import weight_formats
from xpuc.runtime.errors import XpucError
from xpuc.runtime.session import DecoderSession
from xpuc.schedules.linear_quant import dequantize_rows, interleave_rows, quantize_rows
from xpuc.targets.profile import load_profile

TARGET = load_profile("host").cpu_target()


def _mixed_gguf(path, arch: str):
    """Two layers: Q5_0 / Q8_0 / Q4_1 attention (V's format differs from Q's in layer 0, so Q, K and V are not
    fused there), gate and up Q5_0 (layer 1: gate Q4_0, so not fused), down Q4_K (layer 0) and Q6_K (layer 1)
    as raw blocks, one Q5_1 matrix (no kernel: converted), Q5_0 embedding, Q8_0 head."""
    cfg = dataclasses.replace(tiny_config(arch, "swiglu", tie=False, bias=arch == "qwen2"), intermediate_size=256)
    w = random_weights(cfg, 7)
    rng = np.random.default_rng(8)
    types = {"embed_tokens": "Q5_0", "lm_head": "Q8_0"}
    raw = {}
    for i, (v, gate, down) in enumerate([("Q8_0", "Q5_0", "Q4_K"), ("Q5_0", "Q4_0", "Q6_K")]):
        p = f"layers.{i}."
        types |= {p + "q_proj": "Q5_0", p + "k_proj": "Q5_0", p + "v_proj": v, p + "gate_proj": gate,
                  p + "up_proj": "Q5_0", p + "o_proj": "Q4_1" if i == 0 else "Q5_1"}
        raw[p + "down_proj"] = (random_rows(rng, down.lower(), cfg.hidden_size, cfg.intermediate_size,
                                            scale=0.002 if down == "Q4_K" else 0.0005), down)
    write_gguf(path, cfg, w, tensor_types=types, raw_blocks=raw)
    return cfg, raw


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_mixed_format_gguf_keeps_its_blocks_and_decodes_like_the_reference(tmp_path, arch):
    cfg, raw = _mixed_gguf(tmp_path / "m.gguf", arch)
    spec = load_gguf(tmp_path / "m.gguf", with_tokenizer=False)
    fm = weight_formats(spec)
    assert fm.formats["layers.0.down_proj"] == "q4_k" and fm.formats["layers.1.down_proj"] == "q6_k"
    assert fm.formats["layers.0.v_proj"] == "q8_0" and fm.formats["embed_tokens"] == "q5_0"
    assert fm.converted == {"layers.1.o_proj": "Q5_1"} and fm.formats["layers.1.o_proj"] == "q8_0"
    mod, params = export_model(cfg, TARGET, quant="keep", formats=fm.formats)
    names = {n for n, _, _ in params}
    assert {"layers.0.attn.q_weight", "layers.1.attn.qkv_weight", "layers.0.ffn.gate_up_weight",
            "layers.1.ffn.gate_weight", "layers.0.ffn.threshold"} <= names
    assert "layers.1.ffn.threshold" not in names  # no fused thresholded kernel where gate and up differ
    arrays = param_arrays(spec, quant="keep", formats=fm.formats)
    for i in range(2):  # byte for byte the file's blocks, rows interleaved
        rows, t = raw[f"layers.{i}.down_proj"]
        np.testing.assert_array_equal(arrays[f"layers.{i}.ffn.down_weight"],
                                      interleave_rows(rows, t.lower(), cfg.intermediate_size))
    with TARGET:
        ex = tvm.compile(mod, target=TARGET)
    sess = DecoderSession(ex, [tvm.runtime.tensor(arrays[n]) for n, _, _ in params], 64, 16)
    # the reference on the file's dequantized matrices; norms and biases as the module stores them (fp16)
    # (and the converted matrix as q8_0 holds it)
    ref_w = {n: a if a.ndim == 2 else a.astype(np.float16).astype(np.float32) for n, a in spec.weights.items()}
    for n in fm.converted:
        ref_w[n] = dequantize_rows(quantize_rows(ref_w[n], "q8_0"), "q8_0")
    ref = ReferenceModel(spec_from(cfg, ref_w), "float32")
    ids = [int(t) for t in np.random.default_rng(0).integers(0, cfg.vocab_size, 9)]
    got, want = sess.prefill(ids), ref.forward(ids)[-1]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    for _ in range(3):
        tok = int(np.argmax(want))
        got, want = sess.decode(tok), ref.forward([tok])[-1]  # the reference keeps its KV cache
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_keep_needs_a_gguf_model():
    cfg = tiny_config()
    with pytest.raises(XpucError, match="needs a GGUF model"):
        weight_formats(spec_from(cfg, random_weights(cfg)))
