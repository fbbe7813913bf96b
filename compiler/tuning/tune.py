"""Tune prefill workloads with meta_schedule's evolutionary search guided by the XGBoost cost model.

One workload at a time, heaviest first (FLOPs × occurrences), each up to ``trials`` measured candidates
*in total*: trials already in the database count, so rerunning the same command resumes where an
interrupted job stopped (the XGBoost model is warmed with the records already measured). Records are
appended to the database as they are measured; a progress bar shows trials and the best latency so far.

Two meta_schedule defaults are replaced because they cost ~30 s per builder batch on these machines:
``import tvm.s_tir.tensor_intrin`` parses every target's tensor intrinsics (25 s of it CUDA's), both in
the tuning process and in every fresh builder worker. CPU targets need only the x86/Arm ones, so those are
registered alone, and the builder uses :func:`build_kernel`, which skips the import.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import logging
import os
import platform
import signal
import sys
import tempfile
import threading
import time
import types
from dataclasses import dataclass, field

import numpy as np

from xpuc.compiler.passes.apply_tuning_database import workload_hash
from xpuc.compiler.pipeline import DEFAULT_CPU_SCHEDULE, default_cpu_schedule
from xpuc.compiler.tuning.workloads import TuningWorkload
from xpuc.compiler.tuning_db import TuningDatabase, WorkloadEntry
from xpuc.runtime.errors import XpucError
from xpuc.targets.profile import toolchain_for


@dataclass
class WorkloadResult:
    key: str
    shash: str
    trials_before: int
    trials_new: int
    best_us: float | None
    default_us: float | None

    @property
    def speedup(self) -> float | None:
        if self.best_us and self.default_us:
            return self.default_us / self.best_us
        return None


@dataclass
class TuneReport:
    results: list[WorkloadResult] = field(default_factory=list)
    interrupted: bool = False
    seconds: float = 0.0
    current: tuple | None = None  # (workload, hash, index entry) being tuned


def register_cpu_intrinsics() -> None:
    """Make ``import tvm.s_tir.tensor_intrin`` cheap: register the x86 and Arm intrinsics only."""
    name = "tvm.s_tir.tensor_intrin"
    if name in sys.modules:
        return
    spec = importlib.util.find_spec(name)
    pkg = types.ModuleType(name)
    pkg.__path__ = list(spec.submodule_search_locations)
    pkg.__spec__ = spec
    pkg.__package__ = name
    sys.modules[name] = pkg
    for sub in ("x86", "arm_cpu"):
        try:
            importlib.import_module(f"{name}.{sub}")
        except ImportError:  # pragma: no cover - layout differences between TVM releases
            pass


def build_kernel(mod, target, _params):
    """meta_schedule builder function: ``default_build`` without the tensor-intrinsic import."""
    from tvm.driver import build
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    return build(RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod), target=target)


def export_shared(mtriple: str, mod) -> str:
    """meta_schedule export function: a shared library linked with the toolchain for ``mtriple``."""

    # meta_schedule removes the artifact's whole directory after measuring: it must be a fresh one
    path = os.path.join(tempfile.mkdtemp(prefix="xpuc-tune-"), "kernel.so")
    mod.export_library(path, fcompile=toolchain_for(mtriple).fcompile())
    return path


def make_builder(target, workers: int = 2, timeout_s: float = 60.0):
    from tvm.s_tir import meta_schedule as ms

    mtriple = str(target.attrs.get("mtriple", "") or "")
    f_export = functools.partial(export_shared, mtriple) if mtriple else None
    return ms.builder.LocalBuilder(f_build=build_kernel, f_export=f_export, max_workers=workers,
                                   timeout_sec=timeout_s)


def make_local_runner(timeout_s: float = 30.0):
    from tvm.s_tir import meta_schedule as ms

    cfg = ms.runner.EvaluatorConfig(number=3, repeat=1, min_repeat_ms=20, enable_cpu_cache_flush=False)
    return ms.runner.LocalRunner(timeout_sec=timeout_s, evaluator_config=cfg)


class _StopRequest:
    """First Ctrl-C: finish the batch being measured (its records are committed), then stop.
    Second Ctrl-C: the default behaviour (KeyboardInterrupt)."""

    def __init__(self) -> None:
        self.requested = False
        self._old = None

    def __enter__(self) -> _StopRequest:

        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, *_args) -> None:

        self.requested = True
        print("\nxpuc: stopping after the batch being measured (Ctrl-C again to abort now)", file=sys.stderr)
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def __exit__(self, *exc) -> None:

        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)


class _Stopped(Exception):
    pass


def _progress_callback(bar, flop: float, stop: _StopRequest | None = None):
    """A measure callback that advances ``bar``, shows the best latency so far and honours a stop request
    (it runs after the callback that commits the batch's records)."""
    from tvm.s_tir.meta_schedule.measure_callback.measure_callback import _PyMeasureCallback

    best = [float("inf")]

    def apply(task_scheduler, task_id, measure_candidates, builder_results, runner_results) -> None:
        if stop is not None and stop.requested:
            raise _Stopped("tuning stopped by request")
        for r in runner_results:
            if r.error_msg is None and r.run_secs:
                best[0] = min(best[0], float(np.mean([float(s) for s in r.run_secs])))
        if bar is not None:
            bar.update(len(runner_results))
            if best[0] < float("inf"):
                gf = f", {flop / best[0] / 1e9:.1f} GFLOPS" if flop else ""
                bar.set_postfix_str(f"best {best[0] * 1e6:.1f} us{gf}")

    return _PyMeasureCallback(apply)


def _warm_cost_model(model, ctx, records) -> int:
    """Train the XGBoost model on the records already in the database (resume)."""
    from tvm.s_tir import Schedule
    from tvm.s_tir import meta_schedule as ms

    cands, results = [], []
    for rec in records[:256]:
        if not rec.run_secs:
            continue
        try:
            sch = Schedule(ctx.mod)
            rec.trace.apply_to_schedule(sch, remove_postproc=False)
        except Exception:  # noqa: BLE001 - a record that no longer replays is skipped
            continue
        cands.append(ms.MeasureCandidate(sch, rec.args_info))
        results.append(ms.runner.RunnerResult(run_secs=rec.run_secs, error_msg=None))
    if cands:
        model.update(ctx, cands, results)
    return len(cands)


def default_latency_us(wl: TuningWorkload, target) -> float | None:
    """The kernel as xpuc compiles it without a database (the CPU schedule phase), timed here."""
    import tvm

    mod = default_cpu_schedule(target)(tvm.IRModule({"main": wl.mod["main"]}))
    try:
        lib = tvm.compile(mod, target=target)
    except Exception:  # noqa: BLE001 - reported as unknown
        return None
    return time_kernel(lib, mod["main"]) * 1e6


def time_kernel(lib, func, number: int = 5) -> float:
    """Median seconds of ``lib['main']`` on random inputs (host)."""
    import tvm
    from tvm.s_tir import meta_schedule as ms

    dev = tvm.cpu()
    rng = np.random.default_rng(0)
    args = [tvm.runtime.tensor(rng.uniform(-1, 1, [int(s) for s in a.shape]).astype(str(a.dtype)), dev)
            for a in ms.arg_info.ArgInfo.from_prim_func(func)]
    f = lib.mod.time_evaluator("main", dev, number=number, repeat=5, min_repeat_ms=50)
    return float(np.median(f(*args).results))


def tune_workloads(workloads: list[TuningWorkload], target, db: TuningDatabase, trials: int,
                   runner=None, builder=None, progress: bool = True, trials_per_iter: int = 16,
                   measure_default: bool = True, seed: int = 0) -> TuneReport:
    """Tune each workload up to ``trials`` records in ``db``; Ctrl-C stops cleanly (records kept)."""
    if trials < 1:
        raise XpucError("--trials must be at least 1")
    if target.kind.name == "llvm":
        register_cpu_intrinsics()
    logging.getLogger("tvm.s_tir.meta_schedule").setLevel(logging.WARNING)
    runner = runner or make_local_runner()
    builder = builder or make_builder(target)
    report = TuneReport()
    t0 = time.perf_counter()
    done_before = db.trials_by_workload()
    order = sorted(workloads, key=lambda w: -(w.flop * w.weight))
    with _StopRequest() as stop:
        try:
            _tune_loop(order, target, db, trials, runner, builder, progress, trials_per_iter, measure_default,
                       seed, stop, report, done_before)
        except KeyboardInterrupt:
            report.interrupted = True
        if stop.requested:
            report.interrupted = True
        if report.interrupted and report.current is not None:
            _record(db, *report.current)
    report.seconds = time.perf_counter() - t0
    return report


def _tune_loop(order, target, db, trials, runner, builder, progress, trials_per_iter, measure_default, seed,
               stop, report, done_before) -> None:
    from tqdm import tqdm
    from tvm.s_tir import meta_schedule as ms

    for wl in order:
        if stop.requested:
            return
        h = workload_hash(wl.mod)
        before = done_before.get(h, 0)
        entry = db.index.workloads.get(h) or WorkloadEntry(wl.name, wl.bucket, h, wl.flop)
        todo = trials - before
        report.current = (wl, h, entry)
        if todo > 0:
            bar = tqdm(total=todo, desc=f"{wl.key[:48]:48s}", unit="trial", disable=not progress,
                       file=sys.stderr, leave=True)
            ctx = ms.TuneContext(mod=wl.mod, target=target, space_generator="post-order-apply",
                                 search_strategy=ms.search_strategy.EvolutionarySearch(population_size=128),
                                 task_name=wl.key, rand_state=seed, num_threads="physical")
            model = ms.cost_model.XGBModel(num_warmup_samples=min(trials_per_iter, 8), verbose_eval=0,
                                           adaptive_training=True)
            wkl = db.ms.commit_workload(wl.mod)
            _warm_cost_model(model, ctx, list(db.ms.get_top_k(wkl, 256)))
            callbacks = [*ms.measure_callback.MeasureCallback.create("default"),
                         _progress_callback(bar, wl.flop, stop)]
            try:
                ms.tune_tasks(tasks=[ctx], task_weights=[1.0], work_dir=str(db.path / "logs"),
                              max_trials_global=todo, max_trials_per_task=todo,
                              num_trials_per_iter=min(trials_per_iter, todo), builder=builder, runner=runner,
                              database=db.ms, cost_model=model, measure_callbacks=callbacks)
            except Exception:
                if stop.requested:  # raised by the progress callback after the batch was committed
                    return
                raise
            finally:
                bar.close()
        report.current = None
        if measure_default and (entry.default_us is None or entry.default_schedule != DEFAULT_CPU_SCHEDULE) \
                and target.kind.name == "llvm" and _is_host(target):
            # measured (again) with today's default schedule: compile keeps it where it is faster
            entry.default_us = default_latency_us(wl, target)
            entry.default_schedule = DEFAULT_CPU_SCHEDULE if entry.default_us is not None else None
        after = _record(db, wl, h, entry)
        report.results.append(WorkloadResult(wl.key, h, before, after - before, entry.best_us, entry.default_us))


def _record(db: TuningDatabase, wl: TuningWorkload, h: str, entry: WorkloadEntry) -> int:
    """Update the index entry of ``wl`` from the records in the database; returns its trial count."""
    top = db.ms.get_top_k(db.ms.commit_workload(wl.mod), 1)
    entry.best_us = float(np.mean([float(s) for s in top[0].run_secs])) * 1e6 if top and top[0].run_secs else None
    entry.trials = db.trials_by_workload().get(h, 0)
    db.index.workloads[h] = entry
    db.save_index()
    return entry.trials


def _is_host(target) -> bool:

    triple = str(target.attrs.get("mtriple", "") or "")
    return not triple or triple.split("-")[0] == platform.machine()
