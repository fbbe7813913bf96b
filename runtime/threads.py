"""Thread-pool settings for TVM's CPU runtime, applied before the first parallel kernel runs.

TVM's default pool uses fewer threads than there are cores on some machines (one of two vCPUs
here), and its long spin (300,000 iterations) steals time from the caller on small core counts
(measured: a 1536x576 GEMV took 3.7 ms with it on 2 vCPUs and 0.2 ms without), while no spin at all
pays a futex wake-up for each of the ~120 kernels of a decode step. xpuc therefore sets, unless the
user already did:

* ``TVM_NUM_THREADS`` = number of usable cores,
* ``TVM_THREAD_POOL_SPIN_COUNT`` = 30000 (short spin between back-to-back kernels),
* ``TVM_EXCLUDE_WORKER0`` = 0 (the calling thread computes too).
"""

from __future__ import annotations

import os


def usable_cores() -> int:
    """Cores this process may run on (affinity mask, not the machine's total)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - non-Linux
        return os.cpu_count() or 1


def configure_tvm_threads(num_threads: int | None = None) -> int:
    """Set TVM's thread-pool environment; returns the thread count in force."""
    if num_threads is not None:
        os.environ["TVM_NUM_THREADS"] = str(num_threads)
    os.environ.setdefault("TVM_NUM_THREADS", str(usable_cores()))
    os.environ.setdefault("TVM_THREAD_POOL_SPIN_COUNT", "30000")
    os.environ.setdefault("TVM_EXCLUDE_WORKER0", "0")
    return int(os.environ["TVM_NUM_THREADS"])
