"""Running the ``xpuc`` command line from tests, and checking its one-line errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

XPUC = [sys.executable, "-m", "xpuc.compiler.cli"]


def xpuc(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """``xpuc ARGS`` in a subprocess (10 minutes at most), output captured."""
    return subprocess.run([*XPUC, *args], capture_output=True, text=True, cwd=cwd, timeout=600)


def assert_clean_error(r: subprocess.CompletedProcess, pattern: str) -> None:
    """Exit 2, no traceback, exactly one ``xpuc: error:`` line and it mentions ``pattern``."""
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("xpuc: error:")]
    assert len(lines) == 1 and pattern in lines[0], r.stderr


def compile_tiny(d: Path, *args: str) -> Path:
    """Write the tiny test model as an F16 GGUF in ``d`` and ``xpuc compile`` it to ``d/art`` with ``args``."""
    from support.models import random_weights, tiny_config, tiny_tokenizer
    from xpuc.compiler.model_writer import write_gguf

    cfg = tiny_config()
    model = write_gguf(d / "tiny.gguf", cfg, random_weights(cfg), "F16", tiny_tokenizer())
    r = xpuc("compile", str(model), "-o", str(d / "art"), *args)
    assert r.returncode == 0, r.stderr
    return d / "art"
