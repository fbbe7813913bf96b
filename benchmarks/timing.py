"""Shared timing helper of the benchmark scripts (run as `python benchmarks/NAME.py`)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def median_time(fn: Callable[[], object], repeats: int = 3) -> float:
    """Median wall time of ``repeats`` calls of ``fn`` after one warm-up call."""
    fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def interleaved_best(fns: dict[str, Callable[[], object]], rounds: int = 5,
                     settle_s: float = 0.05) -> dict[str, float]:
    """Best wall time per function over ``rounds`` rounds that call each once in turn (after one warm-up each).

    Interleaving gives every engine the same share of a noisy (shared, throttled) host's good and bad moments.
    After each call the thread pools get ``settle_s`` to go idle: onnxruntime's and TVM's workers spin for a
    while after a run and would otherwise take the cores from the engine timed next.
    """
    for fn in fns.values():
        fn()
    best = {name: float("inf") for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
            time.sleep(settle_s)
    return best
