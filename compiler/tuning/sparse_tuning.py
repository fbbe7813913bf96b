"""Measured search over the sparse FFN kernels' knobs, guided by an XGBoost cost model.

The neuron-cluster kernels run over a dynamic number of active clusters, so meta_schedule's static tuning
does not apply. Their knobs are instead searched by measurement at representative sparsities:

* ``cluster`` — neurons per cluster C (the unit of prediction, caching and I/O; must divide d_ff),
* ``threads`` — parallel tasks of the kernel,
* ``mode`` — ``fused`` (one kernel) or ``split`` (the paper's gate kernel then up/down kernel).

The vector width and the unroll of the dot products are fixed by the weight layout (32-value blocks, two
16-lane halves, for every dtype, so that int4 blocks unpack in registers) and are not knobs.

Search: ``init`` random configurations are measured; then, until ``trials`` measurements, an
XGBoost regressor (``xgboost.train``) is fitted on (log2 C, threads, split, sparsity) → log latency and the unmeasured
configuration it predicts fastest is measured next. Each measurement is one compiled kernel timed with
TVM's ``time_evaluator`` on random inputs with ``round((1 - sparsity) · n_clusters)`` random active
clusters. Records (with the model's prediction at the time) go to the tuning database's index.
"""

from __future__ import annotations

import itertools
import math
import os
import sys
from dataclasses import asdict, dataclass

import numpy as np

from xpuc.runtime.errors import XpucError
from xpuc.runtime.formats.bundle import BundleLayout
from xpuc.targets.profile import load_profile


@dataclass
class SparseKnobs:
    cluster: int
    threads: int
    mode: str  # "fused" | "split"


@dataclass
class SparseRecord:
    kind: str
    d_model: int
    d_ff: int
    dtype: str
    sparsity: float
    cluster: int
    threads: int
    mode: str
    us: float
    predicted_us: float | None = None

    @property
    def shape_key(self) -> tuple:
        return (self.kind, self.d_model, self.d_ff, self.dtype, self.sparsity)


def candidate_knobs(d_ff: int, max_threads: int, gated: bool,
                    clusters: tuple[int, ...] = (8, 16, 32, 64)) -> list[SparseKnobs]:
    threads = sorted({t for t in (1, 2, 4, 8, max_threads) if t <= max_threads})
    modes = ("fused", "split") if gated else ("fused",)
    out = [SparseKnobs(c, t, m) for c, t, m in itertools.product(clusters, threads, modes) if d_ff % c == 0]
    if not out:
        raise XpucError(f"no cluster size in {clusters} divides d_ff={d_ff}")
    return out


def measure(kind: str, d_model: int, d_ff: int, dtype: str, sparsity: float, knobs: SparseKnobs,
            target=None, seed: int = 0) -> float:
    """Seconds per call of the kernel(s) for ``knobs`` at ``sparsity`` (median of TVM's evaluator)."""
    import tvm

    from xpuc.schedules.sparse_ffn import sparse_ffn_kernel

    layout = BundleLayout(kind, d_model, d_ff, knobs.cluster, dtype)
    target = target or load_profile("host").cpu_target()
    modes = ["fused"] if knobs.mode == "fused" else ["gate", "updown"]
    funcs = {m: sparse_ffn_kernel(layout, m, knobs.threads).with_attr("global_symbol", m) for m in modes}
    lib = tvm.compile(tvm.IRModule(funcs), target=target)
    rng = np.random.default_rng(seed)
    dev = tvm.cpu()
    if layout.storage_dtype == "uint8":  # int4 blocks: random nibbles, a fixed fp16 scale (0.01) per block
        w = rng.integers(0, 256, layout.shape(), dtype=np.uint8)
        bb = layout.block_bytes
        scale = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)
        blocks = w.reshape(*layout.shape()[:3], -1, bb)
        blocks[..., 0], blocks[..., 1] = scale[0], scale[1]
        if dtype == "q4_1":
            blocks[..., 2], blocks[..., 3] = scale[0], scale[1]
    else:
        w = rng.standard_normal(layout.shape()).astype(layout.storage_dtype)
    k = max(1, round((1.0 - sparsity) * layout.n_clusters))
    idx = np.sort(rng.choice(layout.n_clusters, k, replace=False)).astype(np.int32)
    x = tvm.runtime.tensor(rng.standard_normal(d_model).astype(np.float32), dev)
    args_w = tvm.runtime.tensor(w, dev)
    t_idx = tvm.runtime.tensor(idx, dev)
    thr = tvm.runtime.tensor(np.zeros(1, np.float32), dev)
    y = tvm.runtime.tensor(np.zeros(d_model, np.float32), dev)

    def timed(name, *args) -> float:
        f = lib.mod.time_evaluator(name, dev, number=5, repeat=5, min_repeat_ms=20)
        return float(np.median(f(*args).results))

    if knobs.mode == "fused":
        return timed("fused", x, t_idx, thr, args_w, y)
    g = tvm.runtime.tensor(np.zeros((k, knobs.cluster), np.float32), dev)
    return timed("gate", x, t_idx, args_w, g) + timed("updown", x, t_idx, g, thr, args_w, y)


def _features(k: SparseKnobs, sparsity: float) -> list[float]:
    return [math.log2(k.cluster), float(k.threads), 1.0 if k.mode == "split" else 0.0, sparsity]


def tune_sparse(kind: str, d_model: int, d_ff: int, dtype: str, sparsities: tuple[float, ...], trials: int,
                init: int = 4, max_threads: int | None = None, seed: int = 0, progress: bool = True,
                measure_fn=measure, prior: list[dict] | None = None) -> list[SparseRecord]:
    """XGBoost-guided measured search up to ``trials`` measurements in total, counting ``prior`` records of the
    same shape (a rerun resumes); returns the new measurements as records (in measuring order)."""

    import xgboost as xgb
    from tqdm import tqdm

    if trials < 1:
        raise XpucError("--trials must be at least 1")
    max_threads = max_threads or len(os.sched_getaffinity(0))
    space = [(k, s) for s in sparsities for k in candidate_knobs(d_ff, max_threads, kind != "relu")]
    rng = np.random.default_rng(seed)
    order = list(rng.permutation(len(space)))
    measured: dict[int, float] = {}
    where = {(k.cluster, k.threads, k.mode, sp): j for j, (k, sp) in enumerate(space)}
    for r in prior or []:
        j = where.get((r["cluster"], r["threads"], r["mode"], r["sparsity"]))
        if j is not None and (r["kind"], r["d_model"], r["d_ff"], r["dtype"]) == (kind, d_model, d_ff, dtype):
            measured[j] = r["us"] / 1e6
    records: list[SparseRecord] = []
    bar = tqdm(total=max(0, min(trials, len(space)) - len(measured)), desc=f"sparse {kind} {d_model}x{d_ff} {dtype}",
               unit="trial", disable=not progress, file=sys.stderr)
    try:
        while len(measured) < min(trials, len(space)):
            pred = None
            if len(measured) < init:
                i = next(j for j in order if j not in measured)
            else:
                xs = np.array([_features(*space[j]) for j in measured])
                ys = np.log(np.array(list(measured.values())))
                booster = xgb.train({"max_depth": 3, "eta": 0.3, "verbosity": 0, "seed": seed},
                                    xgb.DMatrix(xs, label=ys), num_boost_round=60)
                rest = [j for j in range(len(space)) if j not in measured]
                preds = booster.predict(xgb.DMatrix(np.array([_features(*space[j]) for j in rest])))
                i = rest[int(np.argmin(preds))]
                pred = float(np.exp(preds.min())) * 1e6
            knobs, s = space[i]
            secs = measure_fn(kind, d_model, d_ff, dtype, s, knobs)
            measured[i] = secs
            records.append(SparseRecord(kind, d_model, d_ff, dtype, s, knobs.cluster, knobs.threads, knobs.mode,
                                        secs * 1e6, pred))
            bar.update(1)
            best = min(measured.values()) * 1e6
            bar.set_postfix_str(f"best {best:.1f} us")
    finally:
        bar.close()
    return records


def best_records(records: list[dict]) -> list[dict]:
    """The fastest record per (kind, d_model, d_ff, dtype, sparsity)."""
    best: dict[tuple, dict] = {}
    for r in records:
        key = (r["kind"], r["d_model"], r["d_ff"], r["dtype"], r["sparsity"])
        if key not in best or r["us"] < best[key]["us"]:
            best[key] = r
    return list(best.values())


def as_dicts(records: list[SparseRecord]) -> list[dict]:
    return [asdict(r) for r in records]


def pick_cluster(db_path, profile, config, dtype: str, sparsity: float) -> tuple[int, str]:
    """The cluster size of the fastest record for ``config``'s FFN shape and ``dtype`` at the tuned sparsity
    nearest to ``sparsity``; the database must have been tuned for ``profile``'s CPU."""
    r = pick_sparse_config(db_path, profile, config, dtype, sparsity)
    return int(r["cluster"]), r["why"]


def pick_sparse_config(db_path, profile, config, dtype: str, sparsity: float) -> dict:
    """The fastest record (cluster, threads, mode, why) for ``config``'s FFN shape and ``dtype`` at the tuned
    sparsity nearest to ``sparsity``; the database must have been tuned for ``profile``'s CPU."""
    from xpuc.compiler.tuning_db import TuningDatabase

    db = TuningDatabase(db_path, target=profile.cpu_target())
    cands = [r for r in best_records(db.index.sparse)
             if (r["d_model"], r["d_ff"], r["dtype"]) == (config.hidden_size, config.intermediate_size, dtype)]
    if not cands:
        raise XpucError(f"tuning database {db_path} has no sparse-kernel records for d_model={config.hidden_size}, "
                        f"d_ff={config.intermediate_size}, {dtype} (run `xpuc tune MODEL --sparse`)")
    r = min(cands, key=lambda r: abs(r["sparsity"] - sparsity))
    return {"cluster": int(r["cluster"]), "threads": int(r["threads"]), "mode": str(r["mode"]),
            "why": f"fastest tuned configuration at sparsity {r['sparsity']:.2f} "
                   f"({r['threads']} threads, {r['mode']}, {r['us']:.1f} us per call)"}
