"""Measure this machine's memory read bandwidth with a compiled, parallel, vectorized TIR reduction."""

from __future__ import annotations

import time

import numpy as np


def measure_read_bandwidth(mib: int = 512, repeats: int = 5) -> float:
    """Best-of-``repeats`` GB/s for reading ``mib`` MiB of fp32 once (row sums, all threads).

    The array is 2x larger than typical last-level caches on phones and laptops; on hosts with a
    larger L3 the figure is an upper bound that still serves as the roofline denominator.
    """
    import tvm
    from tvm.script import tirx as T

    from xpuc.targets.profile import load_profile

    cols = 16384
    rows = max(1, mib * 2**20 // (cols * 4))

    @T.prim_func(s_tir=True)
    def rowsum(a: T.Buffer((rows, cols), "float32"), y: T.Buffer((rows,), "float32")):
        T.func_attr({"tir.noalias": True, "global_symbol": "main"})
        with T.sblock("root"):
            for i in T.parallel(rows):
                acc = T.alloc_buffer((64,), "float32", scope="local")
                for l in T.vectorized(64):
                    acc[l] = T.float32(0)
                for kb in range(cols // 64):
                    for l in T.vectorized(64):
                        acc[l] = acc[l] + a[i, kb * 64 + l]
                y[i] = T.float32(0)
                for l in range(64):
                    y[i] = y[i] + acc[l]

    lib = tvm.compile(tvm.IRModule({"main": rowsum}), target=load_profile("host").cpu_target())
    a = tvm.runtime.tensor(np.ones((rows, cols), np.float32))
    y = tvm.runtime.tensor(np.zeros(rows, np.float32))
    lib["main"](a, y)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        lib["main"](a, y)
        best = min(best, time.perf_counter() - t0)
    return rows * cols * 4 / best / 1e9
