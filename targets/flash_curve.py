"""The storage's measured read curve: O_DIRECT random reads over block sizes x queue depths (as ``fio``'s
``randread`` with ``direct=1``), stored with the host's device profile so that the planner uses measurements.

``xpuc targets --measure-flash PATH`` measures the disk that holds ``PATH`` (a packed model's ``ffn.bin``, or any
large file on that disk) with the runtime's own reader (:class:`~xpuc.runtime.flash_reader.FlashReader`'s native
helper: Linux native AIO on one submission queue where available, else POSIX threads), so that the curve is
what the runtime can get, and saves it to ``$XPUC_CACHE/devices/host-flash.json``.
"""

from __future__ import annotations

import ctypes
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from xpuc.runtime.artifact import cache_dir
from xpuc.runtime.errors import XpucError
from xpuc.runtime.flash_reader import ALIGN, aligned_empty
from xpuc.runtime.formats.jsonfile import JsonRecord
from xpuc.runtime.native import batch_reader

CURVE_SCHEMA = 1
BLOCKS_KIB = (4, 8, 16, 32, 64, 128, 256, 512, 1024)
DEPTHS = (1, 2, 4, 8, 16, 32, 64)


def curve_path() -> Path:
    """Where the host's measured curve is kept."""
    return cache_dir() / "devices" / "host-flash.json"


@dataclass
class FlashCurve(JsonRecord):
    """Random-read throughput of one disk, per block size and queue depth (``points``: ``block_kib``,
    ``queue_depth``, ``random_mbps`` in MB/s of 10^6 bytes, ``iops``)."""

    SCHEMA, WHAT = CURVE_SCHEMA, "flash read curve"

    file: str
    file_bytes: int
    engine: str
    seconds_per_point: float
    measured_at: str
    points: list[dict] = field(default_factory=list)
    schema: int = CURVE_SCHEMA

    def read_curve(self) -> list[dict]:
        """The points in a device profile's ``flash.read_curve`` form."""
        return [dict(p) for p in self.points]

    def mbps(self, block_kib: float, queue_depth: int) -> float:
        """Throughput at the measured block size nearest ``block_kib`` (log scale) and depth nearest
        ``queue_depth``."""
        return float(nearest_point(self.points, block_kib, queue_depth)["random_mbps"])


def nearest_point(points: list[dict], block_kib: float, queue_depth: int | None = None) -> dict:
    """The point nearest ``block_kib`` (log scale), then nearest ``queue_depth`` among that block's points."""
    if not points:
        raise XpucError("the read curve has no points")
    kib = min({p["block_kib"] for p in points}, key=lambda b: abs(np.log2(b) - np.log2(max(block_kib, 1e-3))))
    same = [p for p in points if p["block_kib"] == kib]
    if queue_depth is None or "queue_depth" not in same[0]:
        return max(same, key=lambda p: p["random_mbps"])
    return min(same, key=lambda p: abs(np.log2(p["queue_depth"]) - np.log2(max(queue_depth, 1))))


def measure_read_curve(path: str | os.PathLike, blocks_kib: tuple[int, ...] = BLOCKS_KIB,
                       depths: tuple[int, ...] = DEPTHS, seconds: float = 0.5, seed: int = 0,
                       progress: Callable[[int, int], None] | None = None) -> FlashCurve:
    """Random O_DIRECT reads of ``path`` for ``seconds`` per (block size, queue depth) point.

    Offsets are uniform over the file, aligned to the block size (``fio --rw=randread --direct=1``); each point
    issues batches of requests with ``depth`` in flight until ``seconds`` have passed. Files on filesystems
    without O_DIRECT are refused (the page cache would be measured instead of the disk).
    """
    lib = batch_reader()
    if lib is None:
        raise XpucError("measuring the disk needs the runtime's native reader (a C compiler on this machine)")
    path = Path(path)
    if path.is_dir() and (path / "ffn.bin").is_file():
        path = path / "ffn.bin"
    if not path.is_file():
        raise XpucError(f"{path}: no such file (give a large file on the disk to measure, e.g. a packed ffn.bin)")
    size = path.stat().st_size
    if size < max(blocks_kib) * 1024 * 64:
        raise XpucError(f"{path}: {size / 2**20:.1f} MiB is too small to measure random reads of "
                        f"{max(blocks_kib)} KiB blocks (needs {max(blocks_kib) * 64 // 1024} MiB)")
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECT", 0))
    except OSError as e:
        raise XpucError(f"{path}: cannot open with O_DIRECT ({e.strerror})") from None
    try:
        engine = _probe_engine(lib, fd)
        rng = np.random.default_rng(seed)
        buf = aligned_empty((max(depths) * 2 * max(blocks_kib) * 1024,), "uint8")
        points, total, k = [], len(blocks_kib) * len(depths), 0
        for kib in blocks_kib:
            for depth in depths:
                n, dt = _run_point(lib, engine, fd, size, kib * 1024, depth, seconds, rng, buf)
                points.append({"block_kib": kib, "queue_depth": depth,
                               "random_mbps": round(n * kib * 1024 / dt / 1e6, 1), "iops": round(n / dt)})
                k += 1
                if progress:
                    progress(k, total)
    finally:
        os.close(fd)
    return FlashCurve(str(path.resolve()), size, engine, seconds,
                      datetime.now(timezone.utc).isoformat(timespec="seconds"), points)


def _batch(lib, engine: str):
    return lib.xpuc_aio_batch if engine == "aio" else lib.xpuc_pread_batch


def _probe_engine(lib, fd: int) -> str:
    probe = aligned_empty((ALIGN,), "uint8")
    err = _submit(lib.xpuc_aio_batch, fd, np.zeros(1, np.int64), ALIGN, 1, probe)
    if err == -2:
        return "threads"
    if err:
        raise XpucError(f"O_DIRECT read failed: {os.strerror(err) if err > 0 else 'short read'}")
    return "aio"


def _submit(fn, fd: int, offsets: np.ndarray, block: int, depth: int, buf: np.ndarray) -> int:
    n = len(offsets)
    slots = max(1, buf.nbytes // block)
    base = buf.ctypes.data
    dst = (ctypes.c_void_p * n)(*[base + (i % slots) * block for i in range(n)])
    p64 = ctypes.POINTER(ctypes.c_int64)
    lens = np.full(n, block, np.int64)
    err_info = np.zeros(2, np.int64)
    offs = np.ascontiguousarray(offsets, np.int64)
    return fn(fd, n, offs.ctypes.data_as(p64), lens.ctypes.data_as(p64), lens.ctypes.data_as(p64), dst, depth,
              err_info.ctypes.data_as(p64))


def _run_point(lib, engine: str, fd: int, size: int, block: int, depth: int, seconds: float, rng,
               buf: np.ndarray) -> tuple[int, float]:
    fn = _batch(lib, engine)
    per_batch = max(4 * depth, min(16 * depth, (64 << 20) // block))  # short tails at the batches' ends
    n, t0 = 0, time.perf_counter()
    while True:
        offs = rng.integers(0, size // block, per_batch) * block
        err = _submit(fn, fd, offs, block, depth, buf)
        if err:
            raise XpucError(f"read error while measuring: {os.strerror(err) if err > 0 else 'short read'}")
        n += per_batch
        dt = time.perf_counter() - t0
        if dt >= seconds:
            return n, dt


def load_measured_curve() -> FlashCurve | None:
    """The host's stored curve, if one was measured (a damaged file is reported, not ignored)."""
    p = curve_path()
    return FlashCurve.load(p) if p.is_file() else None
