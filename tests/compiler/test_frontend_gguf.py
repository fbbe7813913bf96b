"""GGUF frontend: metadata, Q/K permutation, every dequantizable type, tokenizer."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
from support.models import random_weights, tiny_config, tiny_tokenizer

from xpuc.compiler.frontend_gguf import load_gguf
from xpuc.compiler.model_writer import write_gguf
from xpuc.runtime.errors import XpucError


@pytest.mark.parametrize("arch,bias,tie", [("llama", False, True), ("qwen2", True, False),
                                           ("mistral", False, False)])
def test_roundtrip_f32(tmp_path, arch, bias, tie):
    cfg = tiny_config(arch, tie=tie, bias=bias)
    w = random_weights(cfg, 1)
    spec = load_gguf(write_gguf(tmp_path / "m.gguf", cfg, w, "F32", tiny_tokenizer()))
    assert spec.config == cfg
    for name in cfg.weight_shapes():  # Q/K permutation undone exactly
        np.testing.assert_array_equal(spec.weights[name], w[name], err_msg=name)


@pytest.mark.parametrize("qtype,tol", [("F16", 1e-3), ("Q8_0", 1e-2), ("Q4_0", 0.15), ("Q4_1", 0.1),
                                       ("Q5_0", 0.08), ("Q5_1", 0.05)])
def test_quantized_weights_close(tmp_path, qtype, tol):
    cfg = tiny_config()
    w = random_weights(cfg, 2)
    spec = load_gguf(write_gguf(tmp_path / "m.gguf", cfg, w, qtype, tiny_tokenizer()))
    for name in ("layers.0.q_proj", "layers.1.down_proj", "embed_tokens"):
        got, ref = spec.weights[name], w[name]
        assert np.abs(got - ref).max() / np.abs(ref).max() < tol, name
    assert spec.weights.meta["layers.0.q_proj"][1] == qtype


@pytest.mark.parametrize("qtype", ["Q4_K", "Q6_K", "Q5_K", "Q3_K", "Q2_K", "IQ4_NL"])
def test_k_quants_dequantized_like_gguf(tmp_path, qtype):
    """Types gguf cannot quantize: raw blocks written directly, frontend must equal gguf's dequantize."""
    q = gguf.GGMLQuantizationType[qtype]
    block, size = gguf.GGML_QUANT_SIZES[q]
    rows, cols = 8, 256
    rng = np.random.default_rng(3)
    raw = rng.integers(0, 256, size=(rows, cols // block * size), dtype=np.uint8)
    ref = gguf.quants.dequantize(raw, q)
    assert ref.shape == (rows, cols)
    w = gguf.GGUFWriter(str(tmp_path / "k.gguf"), "llama")
    w.add_tensor("raw", raw, raw_shape=raw.shape, raw_dtype=q)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    from xpuc.compiler.frontend_gguf import _dequantizer

    reader = gguf.GGUFReader(str(tmp_path / "k.gguf"))
    load, shape, name = _dequantizer(tmp_path / "k.gguf", reader.tensors[0], None)
    assert shape == (rows, cols) and name == qtype
    np.testing.assert_array_equal(load(), ref)


def test_unsupported_quantization_type(tmp_path):
    cfg = tiny_config()
    w = gguf.GGUFWriter(str(tmp_path / "q81.gguf"), "llama")
    raw = np.zeros((4, 40 * 2), dtype=np.uint8)
    w.add_tensor("raw", raw, raw_shape=raw.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    from xpuc.compiler.frontend_gguf import _dequantizer

    reader = gguf.GGUFReader(str(tmp_path / "q81.gguf"))
    with pytest.raises(XpucError, match="Q8_1"):
        _dequantizer(tmp_path / "q81.gguf", reader.tensors[0], None)
    assert cfg  # config unused: the error is raised per tensor


def test_tokenizer_from_gguf(tiny_gguf):
    from xpuc.runtime.tokenizer import XpucTokenizer

    path, cfg, _ = tiny_gguf
    tok = XpucTokenizer.from_source(load_gguf(path).tokenizer)
    ids = tok.encode("hello world")
    names = [tok.token_text(i) for i in ids]
    assert names == ["hell", "o", "Ġworld"]
    assert tok.decode(ids) == "hello world"
    chat = tok.apply_chat_template("hi")
    assert chat.startswith("<|im_start|>user\nhi<|im_end|>") and chat.endswith("assistant\n")
    ids = tok.encode(chat)
    assert ids[0] == tok.bos_token_id  # the control token is matched whole
