"""Step-by-step progress on stderr for long CLI work."""

from __future__ import annotations

import sys
import threading
import time

_open_line = False
# Set by the CLI's SIGINT handler. A KeyboardInterrupt raised inside a library's callback can be turned into
# that library's own error and swallowed on the way out (TVM's passes); the next step then stops instead.
INTERRUPT = threading.Event()


def end_open_line() -> None:
    """Finish a progress line left open by an error, so the error starts on its own line."""
    global _open_line
    if _open_line:
        print(file=sys.stderr, flush=True)
        _open_line = False


class Steps:
    """Prints ``[i/n] label ... 1.2 s`` lines; silent when ``quiet``."""

    def __init__(self, total: int, quiet: bool = False) -> None:
        self.total, self.quiet, self.i = total, quiet, 0
        self._t0 = 0.0

    def start(self, label: str) -> None:
        global _open_line
        if INTERRUPT.is_set():
            raise KeyboardInterrupt
        self.i += 1
        self._t0 = time.perf_counter()
        if not self.quiet:
            print(f"[{self.i}/{self.total}] {label} ...", end="", file=sys.stderr, flush=True)
            _open_line = True

    def done(self, note: str = "") -> None:
        global _open_line
        _open_line = False
        if not self.quiet:
            dt = time.perf_counter() - self._t0
            print(f" {dt:.1f} s{(' (' + note + ')') if note else ''}", file=sys.stderr, flush=True)


def count(label: str, i: int, n: int, quiet: bool = False) -> None:
    """An ``label i/n`` counter updated in place on stderr (a newline once ``i == n``)."""
    global _open_line
    if quiet:
        return
    print(f"\r{label} {i}/{n}", end="\n" if i >= n else "", file=sys.stderr, flush=True)
    _open_line = i < n
