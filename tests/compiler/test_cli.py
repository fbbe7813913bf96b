"""The CLI end to end (subprocess) and its bad-input matrix: one line on stderr, exit 2, nothing half-written."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from support.cli import assert_clean_error, xpuc

from xpuc.runtime.artifact import seal_manifest


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> Path:
    from support.models import random_weights, tiny_config, tiny_tokenizer

    from xpuc.compiler.model_writer import write_gguf

    d = tmp_path_factory.mktemp("cli")
    cfg = tiny_config()
    model = write_gguf(d / "tiny.gguf", cfg, random_weights(cfg, 11), "Q8_0", tiny_tokenizer())
    r = xpuc("compile", str(model), "-o", str(d / "art"), "--device", "host", "--quantize", "fp16")
    assert r.returncode == 0, r.stderr
    assert "[6/6]" in r.stderr  # progress shown
    return d / "art"


def test_targets():
    r = xpuc("targets")
    assert r.returncode == 0
    for name in ("host", "oneplus-12", "oneplus-ace2"):
        assert name in r.stdout
    rows = json.loads(xpuc("targets", "--json").stdout)
    assert {r["name"] for r in rows} >= {"host", "oneplus-12", "oneplus-ace2"}


def test_help_lists_commands():
    r = xpuc("--help")
    assert r.returncode == 0
    for c in ("compile", "run", "inspect", "targets"):
        assert c in r.stdout


def test_run_json_and_greedy_is_deterministic(artifact):
    a = json.loads(xpuc("run", str(artifact), "--prompt", "hello world", "--max-tokens", "8", "--json").stdout)
    b = json.loads(xpuc("run", str(artifact), "--prompt", "hello world", "--max-tokens", "8", "--json").stdout)
    assert a["tokens"] == b["tokens"] and 1 <= len(a["tokens"]) <= 8
    assert a["decode_tok_s"] >= 0 and a["peak_rss_mib"] > 0
    s = json.loads(xpuc("run", str(artifact), "--prompt", "hello", "--chat", "--max-tokens", "8",
                        "--temperature", "0.9", "--top-p", "0.9", "--seed", "3", "--json").stdout)
    s2 = json.loads(xpuc("run", str(artifact), "--prompt", "hello", "--chat", "--max-tokens", "8",
                         "--temperature", "0.9", "--top-p", "0.9", "--seed", "3", "--json").stdout)
    assert s["tokens"] == s2["tokens"]


def test_inspect_artifact_and_model(artifact):
    r = xpuc("inspect", str(artifact))
    assert r.returncode == 0 and "linear_64x" in r.stdout and "params.safetensors" in r.stdout
    m = json.loads(xpuc("inspect", str(artifact), "--json").stdout)
    assert m["format"] == "xpuc-artifact" and m["versions"]["tvm"]
    r = xpuc("inspect", str(artifact.parent / "tiny.gguf"))
    assert r.returncode == 0 and "Q8_0" in r.stdout and "num_layers" in r.stdout
    assert "compile    matrices kept q8_0 x" in r.stdout  # what `xpuc compile` will keep


# ---- bad input -------------------------------------------------------------------------------------------

def test_not_a_gguf(tmp_path):
    p = tmp_path / "x.gguf"
    p.write_bytes(b"this is not a model" * 10)
    assert_clean_error(xpuc("compile", str(p), "-o", str(tmp_path / "out")), "not a GGUF file")
    assert not (tmp_path / "out").exists()


def test_truncated_gguf(tmp_path, artifact):
    src = (artifact.parent / "tiny.gguf").read_bytes()
    p = tmp_path / "t.gguf"
    p.write_bytes(src[: len(src) // 2])
    assert_clean_error(xpuc("compile", str(p), "-o", str(tmp_path / "out")), "truncated")
    assert list(tmp_path.iterdir()) == [p]  # no partial artifact, no temp dir left


def test_corrupted_gguf_header(tmp_path, artifact):
    src = bytearray((artifact.parent / "tiny.gguf").read_bytes())
    src[8:24] = b"\xff" * 16  # tensor and kv counts become absurd
    p = tmp_path / "c.gguf"
    p.write_bytes(bytes(src))
    assert_clean_error(xpuc("compile", str(p), "-o", str(tmp_path / "out")), "c.gguf")
    assert list(tmp_path.iterdir()) == [p]


def test_unknown_quantization_type(tmp_path):
    import gguf
    import numpy as np
    from support.models import random_weights, tiny_config, tiny_tokenizer

    from xpuc.compiler.model_writer import gguf_name

    cfg = tiny_config()
    w = gguf.GGUFWriter(str(tmp_path / "q.gguf"), "llama")
    w.add_block_count(cfg.num_layers)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_heads)
    w.add_head_count_kv(cfg.num_kv_heads)
    tok = tiny_tokenizer()
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tok["tokens"])
    w.add_token_merges(tok["merges"])
    for name, arr in random_weights(cfg).items():
        if name == "layers.0.q_proj":
            raw = np.zeros((64, 2 * 40), np.uint8)
            w.add_tensor(gguf_name(name), raw, raw_shape=raw.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_1)
        else:
            w.add_tensor(gguf_name(name), arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert_clean_error(xpuc("compile", str(tmp_path / "q.gguf"), "-o", str(tmp_path / "out")), "Q8_1")
    assert not (tmp_path / "out").exists()


def test_unsupported_architecture(tmp_path):
    from support.models import random_weights, tiny_config, tiny_tokenizer

    from xpuc.compiler.model_writer import write_gguf

    cfg = tiny_config()
    p = write_gguf(tmp_path / "m.gguf", cfg, random_weights(cfg), "F32", tiny_tokenizer())
    data = p.read_bytes().replace(b"llama", b"gpt2x", 1)  # general.architecture value
    p.write_bytes(data)
    r = xpuc("inspect", str(p))
    assert_clean_error(r, "unsupported architecture 'gpt2x'")
    assert "llama, mistral, qwen2" in r.stderr


def test_missing_tokenizer(tmp_path):
    from support.models import random_weights, tiny_config

    from xpuc.compiler.model_writer import write_gguf

    cfg = tiny_config(vocab=300)
    p = write_gguf(tmp_path / "m.gguf", cfg, random_weights(cfg), "F32", tokenizer=None)
    assert_clean_error(xpuc("compile", str(p), "-o", str(tmp_path / "out")), "no tokenizer")
    assert not (tmp_path / "out").exists()


def test_missing_model_and_unknown_device(tmp_path):
    assert_clean_error(xpuc("compile", str(tmp_path / "nope.gguf"), "-o", str(tmp_path / "o")), "no such file")
    assert_clean_error(xpuc("compile", "x.gguf", "-o", "o", "--device", "pixel-99"), "unknown device 'pixel-99'")


def test_existing_output_is_kept(tmp_path, artifact):
    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "precious.txt").write_text("data")
    r = xpuc("compile", str(artifact.parent / "tiny.gguf"), "-o", str(keep), "--force")
    assert_clean_error(r, "not an xpuc artifact")
    assert (keep / "precious.txt").read_text() == "data"


@pytest.fixture
def artifact_copy(artifact, tmp_path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(artifact, dst)
    return dst


def test_artifact_missing_file(artifact_copy):
    (artifact_copy / "model.so").unlink()
    r = xpuc("run", str(artifact_copy), "--prompt", "hi")
    assert_clean_error(r, "'model.so' listed in the manifest is missing")


def test_artifact_altered_file(artifact_copy):
    p = artifact_copy / "params.safetensors"
    data = bytearray(p.read_bytes())
    data[-3] ^= 0x55
    p.write_bytes(bytes(data))
    assert_clean_error(xpuc("run", str(artifact_copy), "--prompt", "hi"), "fails its checksum")


@pytest.mark.parametrize("key", ["xpuc", "tvm"])
def test_artifact_other_version(artifact_copy, key):
    mf = artifact_copy / "manifest.json"
    m = json.loads(mf.read_text())
    m["versions"][key] = "0.0.1"
    mf.write_text(json.dumps(seal_manifest(m)))  # a consistent manifest written by another version
    assert_clean_error(xpuc("run", str(artifact_copy), "--prompt", "hi"), f"built with {key} 0.0.1")


@pytest.mark.parametrize("field", ["num_layers", "hidden_size", "weights_file", "file_digest"])
def test_manifest_edited_after_writing_is_refused(artifact_copy, field):
    """Any field changed after compile (a config size, a file name, a digest) fails the manifest's own digest."""
    mf = artifact_copy / "manifest.json"
    m = json.loads(mf.read_text())
    if field in ("num_layers", "hidden_size"):
        m["config"][field] += 1
    elif field == "weights_file":
        m["weights_file"] = "params2.safetensors"
    else:
        m["files"]["model.so"] = "0" * 64
    mf.write_text(json.dumps(m))
    assert_clean_error(xpuc("run", str(artifact_copy), "--prompt", "hi"), "altered after it was written")


def test_not_an_artifact(tmp_path):
    assert_clean_error(xpuc("run", str(tmp_path), "--prompt", "hi"), "not an xpuc artifact")


def test_bad_sampling_arguments(artifact):
    assert_clean_error(xpuc("run", str(artifact), "--prompt", "hi", "--top-p", "0"), "top-p")
    assert_clean_error(xpuc("run", str(artifact), "--prompt", "hi", "--max-tokens", "0"), "max-tokens")


def test_console_script_installed():
    exe = shutil.which("xpuc", path=os.path.dirname(sys.executable))
    assert exe, "the `xpuc` console script is not installed next to the interpreter"
    r = subprocess.run([exe, "targets"], capture_output=True, text=True)
    assert r.returncode == 0


def test_compile_quantized_runs_and_records_its_format(tmp_path, artifact):
    r = xpuc("compile", str(artifact.parent / "tiny.gguf"), "-o", str(tmp_path / "q"), "--quantize", "q8_0")
    assert r.returncode == 0, r.stderr
    assert "quantizing weights to q8_0" in r.stderr
    man = json.loads((tmp_path / "q" / "manifest.json").read_text())
    info = man["modules"][0]["info"]
    assert info["weights"] == "q8_0" and info["ffn_thresholds"] == [0.0, 0.0]
    assert (tmp_path / "q" / "params.safetensors").stat().st_size < (artifact / "params.safetensors").stat().st_size
    shown = xpuc("inspect", str(tmp_path / "q")).stdout
    assert "q8_0 (embedding / LM head q8_0; FFN thresholds 0: dense decode)" in shown
    a = json.loads(xpuc("run", str(tmp_path / "q"), "--prompt", "hello world", "--max-tokens", "4", "--json").stdout)
    assert 1 <= len(a["tokens"]) <= 4
    assert_clean_error(xpuc("compile", str(artifact.parent / "tiny.gguf"), "-o", str(tmp_path / "x"),
                            "--quantize", "fp16", "--ffn-stats", "p.json"), "add --quantize")
    assert not (tmp_path / "x").exists()


def test_compile_keeps_a_ggufs_formats_by_default(tmp_path, artifact):
    r = xpuc("compile", str(artifact.parent / "tiny.gguf"), "-o", str(tmp_path / "k"))
    assert r.returncode == 0, r.stderr
    assert "weights: kept q8_0 x" in r.stderr + r.stdout and "copying the GGUF's weight blocks" in r.stderr
    info = json.loads((tmp_path / "k" / "manifest.json").read_text())["modules"][0]["info"]
    assert info["weights"].startswith("kept q8_0 x")
    a = json.loads(xpuc("run", str(tmp_path / "k"), "--prompt", "hello world", "--max-tokens", "4", "--json").stdout)
    assert 1 <= len(a["tokens"]) <= 4


def test_chat_template_from_model_file_cannot_run_commands(tmp_path):
    """A GGUF whose chat template tries to run a shell command: `run --chat` refuses in one line, nothing runs."""
    from support.models import random_weights, tiny_config, tiny_tokenizer

    from xpuc.compiler.model_writer import write_gguf

    cfg = tiny_config()
    tok = dict(tiny_tokenizer(), chat_template="{{ cycler.__init__.__globals__.os.system('touch PWNED') }}")
    model = write_gguf(tmp_path / "evil.gguf", cfg, random_weights(cfg, 3), "F32", tok)
    r = xpuc("compile", str(model), "-o", str(tmp_path / "art"))
    assert r.returncode == 0, r.stderr
    r = xpuc("run", str(tmp_path / "art"), "--prompt", "hi", "--chat", "--max-tokens", "2", cwd=tmp_path)
    assert_clean_error(r, "refused by the sandbox")
    assert not (tmp_path / "PWNED").exists()


def _edit_manifest(art: Path, edit) -> None:
    mf = art / "manifest.json"
    m = json.loads(mf.read_text())
    edit(m)
    mf.write_text(json.dumps(seal_manifest(m)))  # as an attacker would: the digest detects accidents only


@pytest.mark.parametrize("case", ["module_abs", "module_dotdot", "weights_elsewhere", "files_emptied",
                                  "file_key_outside", "unlisted_module", "symlink_out", "files_not_a_dict"])
def test_manifest_cannot_point_outside_the_artifact(artifact_copy, tmp_path, case):
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy(artifact_copy / "model.so", outside / "evil.so")
    files = json.loads((artifact_copy / "manifest.json").read_text())["files"]
    if case == "module_abs":
        _edit_manifest(artifact_copy, lambda m: (m["modules"][0].update(file=str(outside / "evil.so")),
                                                 m["files"].update({str(outside / "evil.so"): files["model.so"]})))
    elif case == "module_dotdot":
        _edit_manifest(artifact_copy, lambda m: m["modules"][0].update(file="../outside/evil.so"))
    elif case == "weights_elsewhere":
        _edit_manifest(artifact_copy, lambda m: m.update(weights_file="/etc/passwd"))
    elif case == "files_emptied":
        _edit_manifest(artifact_copy, lambda m: m.update(files={}))
    elif case == "file_key_outside":
        _edit_manifest(artifact_copy, lambda m: m["files"].update({"../outside/evil.so": "0" * 64}))
    elif case == "unlisted_module":
        shutil.copy(outside / "evil.so", artifact_copy / "other.so")
        _edit_manifest(artifact_copy, lambda m: m["modules"][0].update(file="other.so"))
    elif case == "symlink_out":
        (artifact_copy / "model.so").unlink()
        (artifact_copy / "model.so").symlink_to(outside / "evil.so")
    elif case == "files_not_a_dict":
        _edit_manifest(artifact_copy, lambda m: m.update(files=["model.so"]))
    r = xpuc("run", str(artifact_copy), "--prompt", "hi", "--max-tokens", "1")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.count("xpuc: error:") == 1 and (
        "outside the artifact" in r.stderr or "not listed" in r.stderr or "no files" in r.stderr
        or "malformed (field 'files'" in r.stderr), r.stderr


def test_run_stops_at_a_full_context_and_refuses_more_than_the_model_has(artifact):
    r = xpuc("run", str(artifact), "--prompt", "hello world", "--max-tokens", "100", "--max-context", "16", "--json")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["stop"] == "context" and rep["prompt_tokens"] + rep["generated_tokens"] == 17  # 16 fed + 1 sampled
    assert_clean_error(xpuc("run", str(artifact), "--prompt", "hi", "--max-context", "100000"),
                       "exceeds the model's context length")


def test_the_cli_imports_no_tvm_before_a_command_runs():
    """`xpuc run` loads TVM's runtime library only (TVM_USE_RUNTIME_LIB), which works only if nothing
    imported TVM before it decides; a module-level `import tvm` in anything the CLI imports breaks that."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", "import sys, xpuc.compiler.cli; print('tvm' in sys.modules)"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False"
