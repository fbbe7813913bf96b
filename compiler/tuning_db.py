"""Tuning databases: meta_schedule's JSON files plus an xpuc index, checked before use.

A database is a directory::

    database_workload.json        meta_schedule's workload table (one JSON line per workload)
    database_tuning_record.json   meta_schedule's records (one JSON line per measured candidate)
    xpuc-tuning.json              xpuc's index (schema 1): the target it was tuned for, the sources,
                                  per-workload name / bucket / trials / best latency, and the sparse
                                  kernel knob records (see :mod:`xpuc.compiler.tuning.sparse_tuning`)

The two meta_schedule files are exactly what ``ms.database.JSONDatabase`` reads and writes, so the database
can be used by any meta_schedule tool; the index is a superset. Records are appended line by line while
tuning runs, so an interrupted job keeps everything measured; a half-written last line (the process was
killed mid-write) is dropped with a warning, any other unreadable line is an error naming file and line.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from xpuc.compiler.passes.apply_tuning_database import workload_hash
from xpuc.compiler.pipeline import DEFAULT_CPU_SCHEDULE
from xpuc.runtime.artifact import atomic_path
from xpuc.runtime.errors import XpucError

WORKLOADS = "database_workload.json"
RECORDS = "database_tuning_record.json"
INDEX = "xpuc-tuning.json"
SCHEMA = 1


@dataclass
class WorkloadEntry:
    name: str
    bucket: int
    shash: str
    flop: float = 0.0
    trials: int = 0
    best_us: float | None = None
    default_us: float | None = None
    default_schedule: str | None = None  # version of the default schedule default_us was measured with


@dataclass
class TuningIndex:
    """The xpuc index of a tuning database (JSON on disk, versioned)."""

    target: dict
    schema: int = SCHEMA
    sources: list[str] = field(default_factory=list)
    workloads: dict[str, WorkloadEntry] = field(default_factory=dict)
    sparse: list[dict] = field(default_factory=list)

    def to_json(self) -> str:
        d = asdict(self)
        return json.dumps(d, indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, where: str) -> TuningIndex:
        try:
            d = json.loads(text)
            if d.get("schema") != SCHEMA:
                raise XpucError(f"{where}: tuning index schema {d.get('schema')} (this xpuc reads {SCHEMA})")
            wl = {k: WorkloadEntry(**v) for k, v in d.get("workloads", {}).items()}
            return cls(target=d["target"], sources=list(d.get("sources", [])), workloads=wl,
                       sparse=list(d.get("sparse", [])))
        except XpucError:
            raise
        except (ValueError, KeyError, TypeError) as e:
            raise XpucError(f"{where}: corrupted tuning index ({type(e).__name__}: {e})") from None


def target_key(target) -> dict:
    """The parts of a target that decide whether a tuned schedule is valid on it."""
    import tvm

    t = target if isinstance(target, tvm.target.Target) else tvm.target.Target(target)
    attrs = t.attrs
    mattr = sorted(str(a) for a in (attrs.get("mattr") or []))
    return {"kind": t.kind.name, "mtriple": str(attrs.get("mtriple", "") or ""),
            "mcpu": str(attrs.get("mcpu", "") or ""), "mattr": mattr}


def _check_lines(path: Path, what: str, valid=None, invalid_msg: str = "") -> int:
    """Parse every JSON line (and check it with ``valid``); drop a half-written last line; return the count."""
    if not path.exists():
        return 0
    data = path.read_bytes()
    lines = data.split(b"\n")
    n = 0
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError:
            last = i == len(lines) and not data.endswith(b"\n")
            if last:  # killed mid-append: nothing complete is lost by dropping it
                keep = data[: len(data) - len(line)]
                with atomic_path(path) as tmp:
                    tmp.write_bytes(keep)
                print(f"xpuc: {path}: dropped a half-written last {what} line", file=sys.stderr)
                continue
            raise XpucError(f"{path}: line {i} is not a valid {what} (corrupted file); remove the line or "
                            "restore the file from a copy") from None
        if valid is not None and not valid(obj):
            raise XpucError(f"{path}: line {i} {invalid_msg}")
        n += 1
    return n


class TuningDatabase:
    """A checked tuning database directory; ``.ms`` is the meta_schedule ``JSONDatabase`` over it."""

    def __init__(self, path: str | os.PathLike, create: bool = False, target=None) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            if not create:
                raise XpucError(f"tuning database {self.path} does not exist (create it with `xpuc tune … --db DIR`)")
            self.path.mkdir(parents=True)
        index_path = self.path / INDEX
        if index_path.is_file():
            self.index = TuningIndex.from_json(index_path.read_text(), str(index_path))
            if target is not None and target_key(target) != self.index.target:
                raise XpucError(f"tuning database {self.path} was tuned for {_describe(self.index.target)}, "
                                f"not {_describe(target_key(target))}; use another --db directory")
        elif (self.path / RECORDS).exists() or (self.path / WORKLOADS).exists():
            raise XpucError(f"{self.path}: meta_schedule files without {INDEX}; not an xpuc tuning database")
        elif not create:
            raise XpucError(f"{self.path}: not a tuning database (no {INDEX})")
        else:
            if target is None:
                raise XpucError("internal: a new tuning database needs a target")
            self.index = TuningIndex(target=target_key(target))
            self.save_index()
        self.n_workloads = _check_lines(self.path / WORKLOADS, "workload")
        self.n_records = _check_lines(
            self.path / RECORDS, "tuning record",
            lambda rec: isinstance(rec, list) and len(rec) == 2 and isinstance(rec[0], int)
            and 0 <= rec[0] < self.n_workloads,
            f"refers to no workload of {WORKLOADS} (corrupted or mixed files)")
        self._ms = None

    @property
    def ms(self):
        """The meta_schedule database (opened lazily: loading parses every record)."""
        if self._ms is None:
            from tvm.s_tir import meta_schedule as ms

            try:
                self._ms = ms.database.JSONDatabase(path_workload=str(self.path / WORKLOADS),
                                                    path_tuning_record=str(self.path / RECORDS))
            except Exception as e:  # noqa: BLE001 - TVM raises plain errors for unreadable records
                msg = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
                raise XpucError(f"{self.path}: cannot load the tuning records ({msg[:160]})") from None
        return self._ms

    def save_index(self) -> None:
        with atomic_path(self.path / INDEX) as tmp:
            tmp.write_text(self.index.to_json())

    def trials_by_workload(self) -> dict[str, int]:
        """Structural hash (hex) of each workload -> records measured for it."""
        counts: dict[str, int] = {}
        for rec in self.ms.get_all_tuning_records():
            key = workload_hash(rec.workload.mod)
            counts[key] = counts.get(key, 0) + 1
        return counts

    def default_wins(self) -> tuple[set[str], int]:
        """(workload hashes whose default schedule measured faster than their best record, number of entries
        whose default latency is missing or was measured with an older default schedule)."""

        wins, stale = set(), 0
        for h, w in self.index.workloads.items():
            if w.default_us is None or w.default_schedule != DEFAULT_CPU_SCHEDULE:
                stale += 1
            elif w.best_us is not None and w.default_us <= w.best_us:
                wins.add(h)
        return wins, stale

    def summary(self) -> str:
        tuned = sum(1 for w in self.index.workloads.values() if w.best_us is not None)
        return (f"{self.path}: {_describe(self.index.target)}; {self.n_workloads} workloads, "
                f"{self.n_records} records, {tuned} with a best schedule, "
                f"{len(self.index.sparse)} sparse-kernel records")


def _describe(key: dict) -> str:
    parts = [key.get("kind", "?")] + [key[k] for k in ("mtriple", "mcpu") if key.get(k)]
    return " ".join(parts)


def merge_databases(sources: list[str | os.PathLike], output: str | os.PathLike) -> TuningDatabase:
    """Union of tuning databases tuned for the same target; ``output`` must not exist (written atomically)."""

    out = Path(output)
    if out.exists():
        raise XpucError(f"{out} exists; merge writes a new database (choose another -o)")
    dbs = [TuningDatabase(s) for s in sources]
    if len(dbs) < 2:
        raise XpucError("tune merge needs at least two databases")
    for db in dbs[1:]:
        if db.index.target != dbs[0].index.target:
            raise XpucError(f"cannot merge {db.path} ({_describe(db.index.target)}) with {dbs[0].path} "
                            f"({_describe(dbs[0].index.target)}): different targets")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        merged = TuningDatabase(tmp, create=True, target=_target_from_key(dbs[0].index.target))
        merged.index.target = dbs[0].index.target
        seen_sparse = set()
        for db in dbs:
            for rec in db.ms.get_all_tuning_records():
                merged.ms.commit_tuning_record(_rebind(merged.ms, rec))
            for key, entry in db.index.workloads.items():
                cur = merged.index.workloads.get(key)
                if cur is None:
                    merged.index.workloads[key] = WorkloadEntry(**asdict(entry))
                else:
                    cur.trials += entry.trials
                    if entry.best_us is not None and (cur.best_us is None or entry.best_us < cur.best_us):
                        cur.best_us = entry.best_us
                    cur.default_us = cur.default_us or entry.default_us
            for s in db.index.sparse:
                k = json.dumps(s, sort_keys=True)
                if k not in seen_sparse:
                    seen_sparse.add(k)
                    merged.index.sparse.append(s)
            merged.index.sources += [s for s in db.index.sources if s not in merged.index.sources]
        merged.save_index()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return TuningDatabase(out)


def _rebind(msdb, rec):
    """The record re-attached to the merged database's copy of its workload."""
    from tvm.s_tir import meta_schedule as ms

    wl = msdb.commit_workload(rec.workload.mod)
    return ms.database.TuningRecord(rec.trace, wl, rec.run_secs, rec.target, rec.args_info)


def _target_from_key(key: dict):
    import tvm

    d = {"kind": key["kind"]}
    if key.get("mtriple"):
        d["mtriple"] = key["mtriple"]
    if key.get("mcpu"):
        d["mcpu"] = key["mcpu"]
    if key.get("mattr"):
        d["mattr"] = key["mattr"]
    return tvm.target.Target(d)
