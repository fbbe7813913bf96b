"""Expected failures of the CLI: bad numbers, unusable outputs, a closed pipe, Ctrl-C -- one line, nothing left."""

from __future__ import annotations

import resource
import signal
import subprocess
import time
from pathlib import Path

import pytest
from support.cli import XPUC, assert_clean_error, xpuc


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    from support.models import random_weights, tiny_config, tiny_tokenizer

    from xpuc.compiler.model_writer import write_gguf

    cfg = tiny_config()
    return write_gguf(tmp_path_factory.mktemp("err") / "tiny.gguf", cfg, random_weights(cfg, 5), "F32",
                      tiny_tokenizer())


@pytest.fixture(scope="module")
def text(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("text") / "cal.txt"
    p.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    return p


@pytest.mark.parametrize("argv, pattern", [
    (["--threads", "0", "targets"], "--threads: must be at least 1"),
    (["--threads", "-3", "targets"], "--threads: must be at least 1"),
    (["run", "x", "--max-tokens", "0", "--prompt", "a"], "--max-tokens: must be at least 1"),
    (["run", "x", "--max-context", "-1", "--prompt", "a"], "--max-context: must be at least 1"),
    (["run", "x", "--top-p", "1.5", "--prompt", "a"], "--top-p: must be in (0, 1]"),
    (["run", "x", "--temperature", "nan", "--prompt", "a"], "--temperature: must be in [0, 100]"),
    (["plan", "m", "--stats", "s", "--memory-budget", "1GiB", "--cluster", "0"], "--cluster: must be at least 1"),
    (["plan", "m", "--stats", "s", "--memory-budget", "1GiB", "--context", "0"], "--context: must be at least 1"),
    (["profile", "m", "--text", "t", "--sparsity", "1"], "--sparsity: must be in (0, 1)"),
    (["profile", "m", "--text", "t", "--recall", "0.2"], "--recall: must be in [0.5, 1)"),
    (["synth", "-o", "x", "--layers", "0"], "--layers: must be at least 1"),
    (["bench", "a", "--tokens", "three"], "--tokens: 'three' is not an integer"),
    (["bench", "a", "--io-threads", "0"], "--io-threads: must be at least 1"),
    (["tune", "m", "--db", "d", "--trials", "0"], "--trials: must be at least 1"),
    (["tune", "m", "--db", "d", "--rpc-timeout", "0"], "--rpc-timeout: must be in (0, inf)"),
    (["rpc-tracker", "--port", "70000"], "--port: must be at most 65535"),
])
def test_numeric_arguments_are_validated(argv, pattern):
    assert_clean_error(xpuc(*argv), pattern)


@pytest.mark.parametrize("where, pattern", [("missing_dir", "no such directory"),
                                            ("parent_is_a_file", "no such directory"),
                                            ("output_is_a_dir", "is a directory")])
def test_unusable_output_path_is_one_line_and_leaves_nothing(model, text, tmp_path, where, pattern):
    (tmp_path / "afile").write_text("x")
    (tmp_path / "adir").mkdir()
    out = {"missing_dir": tmp_path / "no" / "p.json", "parent_is_a_file": tmp_path / "afile" / "p.json",
           "output_is_a_dir": tmp_path / "adir"}[where]
    before = sorted(p.name for p in tmp_path.rglob("*"))
    r = xpuc("profile", str(model), "--text", str(text), "--max-tokens", "64", "--sparsity", "0.5", "-o", str(out))
    assert_clean_error(r, pattern)
    assert "profiling" not in r.stderr  # refused before the work, not after
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


@pytest.mark.parametrize("command", ["compile", "synth"])
def test_output_directory_under_a_file_is_one_line(model, tmp_path, command):
    (tmp_path / "afile").write_text("x")
    argv = ["compile", str(model)] if command == "compile" else ["synth", "--shape", "tiny"]
    r = xpuc(*argv, "-o", str(tmp_path / "afile" / "out"))
    assert_clean_error(r, "afile")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_full_disk_is_one_line_and_removes_the_partial_file(model, text, tmp_path):
    """A file-size limit makes the write fail as a full disk does (EFBIG instead of ENOSPC)."""

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # fail the write instead of killing the process
        resource.setrlimit(resource.RLIMIT_FSIZE, (2048, 2048))

    r = subprocess.run([*XPUC, "profile", str(model), "--text", str(text), "--max-tokens", "64", "--sparsity", "0.5",
                        "-o", str(tmp_path / "p.json")], capture_output=True, text=True, preexec_fn=limit, timeout=300)
    assert_clean_error(r, "File too large")
    assert list(tmp_path.iterdir()) == []


def test_closed_stdout_is_one_line(model):
    """`xpuc inspect model | head -0`: the reader is gone before xpuc writes."""
    p = subprocess.Popen([*XPUC, "inspect", str(model)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    p.stdout.close()
    err = p.stderr.read()
    assert p.wait(timeout=120) == 2, err
    assert "Traceback" not in err and err.count("xpuc: error:") == 1 and "broken pipe" in err, err


def test_ctrl_c_while_tvm_compiles_is_exit_130_and_leaves_nothing(model, tmp_path):
    out = tmp_path / "art"
    p = subprocess.Popen([*XPUC, "compile", str(model), "-o", str(out)], stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    seen = ""
    deadline = time.monotonic() + 120
    while "compiling for" not in seen and time.monotonic() < deadline:
        seen += p.stderr.read(1)
    time.sleep(0.3)  # inside TVM's passes
    p.send_signal(signal.SIGINT)
    err = seen + p.stderr.read()
    assert p.wait(timeout=120) == 130, err
    assert "xpuc: interrupted" in err and "Traceback" not in err, err
    assert list(tmp_path.iterdir()) == []


def test_ctrl_c_swallowed_inside_a_library_still_stops_at_the_next_step(model, tmp_path, monkeypatch, capsys):
    """A KeyboardInterrupt raised inside a library callback can come out as that library's error and be dropped
    (TVM's passes): the interrupt is recorded, and the next progress step stops the command."""
    import xpuc.compiler.pipeline as pipeline
    from xpuc.compiler.cli import main

    real = pipeline.build

    def build_that_swallows_ctrl_c(*a, **k):
        try:
            signal.raise_signal(signal.SIGINT)
        except KeyboardInterrupt:
            pass  # what a library that converts and drops the exception does
        return real(*a, **k)

    monkeypatch.setattr(pipeline, "build", build_that_swallows_ctrl_c)
    out = tmp_path / "art"
    assert main(["compile", str(model), "-o", str(out)]) == 130
    assert "xpuc: interrupted" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_int8_dot_products_for_a_float16_build_are_refused(model, tmp_path):
    assert_clean_error(xpuc("compile", str(model), "--quantize", "fp16", "--dot", "int8", "-o", str(tmp_path / "a")),
                       "--dot int8 applies to GGML blocks")
    assert not (tmp_path / "a").exists()
