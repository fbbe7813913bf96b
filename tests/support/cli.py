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
