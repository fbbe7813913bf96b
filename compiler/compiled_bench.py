"""``xpuc bench ART`` for compiled decoders, by llama-bench's conventions.

Tests ``ppP`` (prefill P tokens into an empty KV cache) and ``tgN`` (generate N tokens one at a time from an
empty cache, fed random token ids as llama-bench does; BOS first when the tokenizer adds one), each repeated
``r`` times; each test's speed is the mean of the repetitions' tokens per second, ± their standard deviation.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np


@dataclass
class BenchTest:
    test: str  # "pp512" / "tg128" / "tg128 @ d512"
    tokens: int
    t_s: list[float]  # tokens/s of each repetition

    @property
    def mean(self) -> float:
        return float(np.mean(self.t_s))

    @property
    def stddev(self) -> float:
        return float(np.std(self.t_s, ddof=1)) if len(self.t_s) > 1 else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "avg_ts": round(self.mean, 2), "stddev_ts": round(self.stddev, 2)}


def bench_session(session, vocab_size: int, n_prompt: int, n_gen: int, repetitions: int, bos: int | None = None,
                  seed: int = 0, progress=None, depth: int = 0) -> list[BenchTest]:
    """The ``ppP`` and ``tgN`` tests (either skipped when its size is 0) on ``session``; one warm-up run each.
    With ``depth`` (llama-bench's ``-d``) each run first fills the KV cache with that many random tokens, untimed,
    and the tests are named ``ppP @ dD`` / ``tgN @ dD``."""
    rng = np.random.default_rng(seed)
    tests = []
    at = f" @ d{depth}" if depth else ""

    def start() -> None:
        session.reset()
        if depth:
            session.prefill(rng.integers(0, vocab_size, depth).tolist())

    if n_prompt:
        times = []
        for r in range(repetitions + 1):
            ids = rng.integers(0, vocab_size, n_prompt).tolist()
            start()
            t0 = time.perf_counter()
            session.prefill(ids)
            if r:  # the first run warms up
                times.append(n_prompt / (time.perf_counter() - t0))
            if progress:
                progress(f"pp{n_prompt}{at}", r, repetitions)
        tests.append(BenchTest(f"pp{n_prompt}{at}", n_prompt, times))
    if n_gen:
        times = []
        for r in range(repetitions + 1):
            start()
            token = bos if bos is not None and not depth else int(rng.integers(vocab_size))
            t0 = time.perf_counter()
            session.prefill([token])
            for _ in range(n_gen - 1):
                session.decode(int(rng.integers(vocab_size)))
            if r:
                times.append(n_gen / (time.perf_counter() - t0))
            if progress:
                progress(f"tg{n_gen}{at}", r, repetitions)
        tests.append(BenchTest(f"tg{n_gen}{at}", n_gen, times))
    return tests


def markdown_table(rows: list[dict]) -> str:
    """llama-bench's table: model, size, params, backend, threads, test, t/s."""
    head = "| model | size | params | backend | threads | test | t/s |"
    lines = [head, "| --- | ---: | ---: | --- | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['size_mib']:.2f} MiB | {r['params_m']:.2f} M | {r['backend']} | "
                     f"{r['threads']} | {r['test']} | {r['avg_ts']:.2f} ± {r['stddev_ts']:.2f} |")
    return "\n".join(lines)
