"""Hugging Face directory frontend: config mapping, sharded safetensors, tokenizer, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from support.models import random_weights, tiny_config, tiny_tokenizer

from xpuc.compiler.frontends import load_model
from xpuc.compiler.model_writer import write_hf_dir
from xpuc.runtime.errors import XpucError
from xpuc.runtime.tokenizer import tokenizer_json_from_gguf_vocab


def _tok_json() -> str:
    t = tiny_tokenizer()
    return tokenizer_json_from_gguf_vocab(t["tokens"], t["merges"], t["token_types"])


@pytest.mark.parametrize("arch,kind,tie,shards", [("llama", "swiglu", True, 1), ("qwen2", "reglu", False, 3),
                                                  ("mistral", "drelu", False, 2)])
def test_roundtrip(tmp_path, arch, kind, tie, shards):
    cfg = tiny_config(arch, kind, tie=tie, bias=arch == "qwen2")
    w = random_weights(cfg, 5)
    write_hf_dir(tmp_path, cfg, w, shards=shards, tokenizer_json=_tok_json(),
                 tokenizer_config={"eos_token": "<|im_end|>", "chat_template": "{{ messages[0]['content'] }}"})
    spec = load_model(tmp_path)
    assert spec.config == cfg
    for name in cfg.weight_shapes():
        np.testing.assert_array_equal(spec.weights[name], w[name], err_msg=name)
    assert spec.tokenizer.eos_token_ids == [len(tiny_tokenizer()["tokens"]) - 1]
    if shards > 1:
        assert len(list(tmp_path.glob("model-*.safetensors"))) == shards


def test_fp16_storage(tmp_path):
    cfg = tiny_config()
    w = random_weights(cfg, 6)
    write_hf_dir(tmp_path, cfg, w, dtype="float16", tokenizer_json=_tok_json())
    spec = load_model(tmp_path)
    np.testing.assert_array_equal(spec.weights["layers.0.up_proj"], w["layers.0.up_proj"].astype(np.float16))


def test_unsupported_architecture(tmp_path):
    cfg = tiny_config()
    write_hf_dir(tmp_path, cfg, random_weights(cfg), tokenizer_json=_tok_json())
    d = json.loads((tmp_path / "config.json").read_text())
    d["model_type"] = "gpt_neox"
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(XpucError, match="unsupported architecture 'gpt_neox'.*llama, mistral, qwen2"):
        load_model(tmp_path)


def test_missing_tokenizer(tmp_path):
    cfg = tiny_config()
    write_hf_dir(tmp_path, cfg, random_weights(cfg))
    with pytest.raises(XpucError, match="missing tokenizer"):
        load_model(tmp_path)
    assert load_model(tmp_path, with_tokenizer=False).tokenizer is None


def test_missing_weight(tmp_path):
    cfg = tiny_config()
    w = random_weights(cfg)
    del w["layers.1.up_proj"]
    cfg_small = cfg
    from safetensors.numpy import save_file

    write_hf_dir(tmp_path, cfg_small, {**w, "layers.1.up_proj": np.zeros((1, 1), np.float32)},
                 tokenizer_json=_tok_json())
    (tmp_path / "model.safetensors").unlink()
    from xpuc.compiler.frontend_hf import hf_name

    save_file({hf_name(k): v for k, v in w.items()}, str(tmp_path / "model.safetensors"))
    with pytest.raises(XpucError, match="layers.1.up_proj' is missing"):
        load_model(tmp_path)
