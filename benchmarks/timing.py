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


def interleaved_best(fns: dict[str, Callable[[], object]], rounds: int = 5) -> dict[str, float]:
    """Best wall time per function over ``rounds`` rounds that call each in turn.

    Interleaving gives every engine the same share of a noisy (shared, throttled) host's good and bad moments.
    Within a round each function is called twice back to back and the second call is timed: the first one
    absorbs the previous engine's thread pool still spinning after its run (onnxruntime's and TVM's workers
    both spin for a while) and wakes this engine's own workers, so each engine is timed in its steady state.
    """
    best = {name: float("inf") for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            fn()
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    return best
