"""FlashReader: reads neuron-cluster records from the flash file into cache slots.

* ``O_DIRECT`` when the filesystem allows it and the records are 4 KiB-aligned, so the page cache cannot
  hide the I/O; otherwise buffered reads followed by ``posix_fadvise(DONTNEED)`` (the pages are dropped
  after each read) — ``metrics()["direct"]`` says which.
* Records are read as 4 KiB-aligned spans into a per-thread bounce buffer and copied into their slots
  (records need not be aligned); records whose spans touch are merged into one request.
* Reads are issued by ``io_threads`` dedicated threads; :meth:`submit` returns a future per batch, so
  the caller computes on what has arrived while later batches are in flight. Within a batch,
  ``queue_depth`` requests are in flight: on one submission queue with Linux native AIO (O_DIRECT), else
  from that many POSIX threads, else one by one from Python -- ``metrics()["engine"]`` says which
  (``aio``, ``threads``, ``python``).
* Every record's CRC-32 is checked after the read; a short read (truncated file), an OS error or a
  checksum mismatch raises :class:`~xpuc.runtime.errors.XpucError`.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import threading
import time
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from xpuc.runtime.errors import XpucError
from xpuc.runtime.native import batch_reader

ALIGN = 4096


def aligned_empty(shape: tuple[int, ...], dtype: str) -> np.ndarray:
    """A page-aligned, writable numpy array (anonymous mmap, with at least one spare page at the end so that
    O_DIRECT reads may round their length up): valid O_DIRECT target, zero-copy for TVM."""
    n = int(np.prod(shape)) * np.dtype(dtype).itemsize
    buf = mmap.mmap(-1, -(-n // ALIGN) * ALIGN + ALIGN)
    return np.frombuffer(buf, dtype=dtype, count=int(np.prod(shape))).reshape(shape)


@dataclass(frozen=True)
class RecordRows:
    """Destinations of a batch of records without an array view per record: record ``k`` goes to row
    ``rows[k]`` of ``table`` (2-D uint8, rows contiguous: a cache pool's slots), from byte ``skip`` of the row
    (a split record's part)."""

    table: np.ndarray
    rows: np.ndarray
    skip: int = 0

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, k: slice) -> RecordRows:
        return RecordRows(self.table, self.rows[k], self.skip)

    def addresses(self) -> np.ndarray:
        """(n,) uint64 destination addresses."""
        base = self.table.__array_interface__["data"][0] + self.skip
        return (base + np.asarray(self.rows, np.int64) * self.table.strides[0]).astype(np.uint64)

    def row(self, k: int, nbytes: int) -> np.ndarray:
        return self.table[int(self.rows[k]), self.skip:self.skip + nbytes]


def _addresses(dests) -> np.ndarray:
    if isinstance(dests, RecordRows):
        return dests.addresses()
    return np.array([d.ctypes.data for d in dests], np.uint64)


def _owner(a: np.ndarray):
    base = a
    while isinstance(base, np.ndarray):
        base = base.base
    return base


def _addr(buf) -> int:
    return np.frombuffer(buf, np.uint8).__array_interface__["data"][0]


def _room(a: np.ndarray) -> int:
    """Bytes writable from ``a``'s first element to the end of the mmap it lives in (0 if unknown)."""
    base = _owner(a)
    if not isinstance(base, mmap.mmap) or not a.flags.c_contiguous:
        return 0
    return _addr(base) + len(base) - a.__array_interface__["data"][0]


class FlashReader:
    """Reads fixed-size records at known offsets of one file.

    Parameters
    ----------
    path:
        The flash file (``ffn.bin``).
    record_bytes:
        Size of one record (a neuron cluster).
    io_threads:
        Threads issuing reads.
    direct:
        Try ``O_DIRECT`` (falls back to buffered reads + ``posix_fadvise(DONTNEED)``).
    merge_gap:
        Merge two records' reads when at most this many bytes lie between their spans.
    max_span:
        Largest merged request.
    queue_depth:
        Requests in flight within one batch (native helper: that many POSIX threads).
    native:
        Use the compiled batch helper (:mod:`xpuc.runtime.native`) when it is available: one call per batch,
        without Python's per-request overhead; otherwise the requests are issued one by one from Python.
    max_batch_bytes:
        A batch whose requests' spans add up to more is issued in parts of at most this many bytes, so that the
        bounce buffer (accounted: :attr:`staging_bytes`) stays small.
    engine:
        ``"auto"`` (native AIO where the file is opened O_DIRECT and the kernel allows it, else threads),
        ``"aio"``, ``"threads"`` or ``"python"``; what is not available here falls back in that order.
    """

    def __init__(self, path: str | os.PathLike, record_bytes: int, io_threads: int = 1, direct: bool = True,
                 merge_gap: int = 0, max_span: int = 1 << 20, queue_depth: int = 4, native: bool = True,
                 engine: str = "auto", max_batch_bytes: int = 8 << 20) -> None:

        self.path = Path(path)
        if engine not in ("auto", "aio", "threads", "python"):
            raise XpucError(f"unknown I/O engine '{engine}' (known: auto, aio, threads, python)")
        if not self.path.is_file():
            raise XpucError(f"{self.path}: flash file missing")
        self.record_bytes = record_bytes
        self.merge_gap, self.max_span, self.queue_depth = merge_gap, max_span, max(1, queue_depth)
        self.max_batch_bytes = max(max_batch_bytes, max_span)
        self._native = batch_reader() if native else None
        self._local = threading.local()
        self.direct = False
        flags = os.O_RDONLY
        if direct and hasattr(os, "O_DIRECT"):
            try:
                fd = os.open(self.path, flags | os.O_DIRECT)
                probe = aligned_empty((ALIGN,), "uint8")
                os.preadv(fd, [memoryview(probe)], 0)
                self.fd, self.direct = fd, True
            except OSError:
                self.fd = os.open(self.path, flags)
        else:
            self.fd = os.open(self.path, flags)
        self.size = os.fstat(self.fd).st_size
        if self._native is None or engine == "python":
            self._native, self.engine = None, "python"
        else:
            self.engine = "aio" if engine in ("auto", "aio") and self.direct else "threads"
        self._pool = ThreadPoolExecutor(max_workers=max(1, io_threads), thread_name_prefix="xpuc-io")
        self._lock = threading.Lock()
        self._staging: dict[int, int] = {}  # thread -> bytes of its bounce buffer
        self.bytes_read = 0
        self.requests = 0
        self.records = 0
        self.io_seconds = 0.0  # summed over reads (busy time of the I/O threads)

    # --- reads ------------------------------------------------------------------------------------------
    def _preadv(self, bufs: list[memoryview], offset: int) -> int:
        return os.preadv(self.fd, bufs, offset)

    def _read_exact(self, buf: memoryview, offset: int) -> None:
        try:
            got = self._preadv([buf], offset)
        except OSError as e:
            raise XpucError(f"{self.path}: read error at offset {offset}: {e.strerror}") from None
        if got != buf.nbytes:
            raise XpucError(f"{self.path}: short read at offset {offset} ({got} of {buf.nbytes} bytes; "
                            "file truncated?)")

    def _bounce(self, nbytes: int) -> np.ndarray:
        b = getattr(self._local, "buf", None)
        if b is None or b.nbytes < nbytes:
            b = aligned_empty((max(nbytes, 1 << 20),), "uint8")
            with self._lock:
                self._staging[threading.get_ident()] = b.nbytes
            self._local.buf = b
        return b

    @property
    def staging_bytes(self) -> int:
        """Bytes of the I/O threads' bounce buffers (each at most ``max_batch_bytes``, or one ``max_span``)."""
        with self._lock:
            return int(sum(self._staging.values()))

    def read(self, offsets: np.ndarray, dests: list[np.ndarray] | RecordRows, crcs: np.ndarray | None = None,
             record_bytes: int | None = None) -> None:
        """Read records at ``offsets`` (sorted) into ``dests`` (``record_bytes`` each, any alignment; a split
        record's part when given; arrays, or :class:`RecordRows`).

        Records whose 4 KiB-aligned spans touch (or lie within ``merge_gap`` bytes) are merged into one
        request of at most ``max_span`` bytes; each request reads its aligned span into a per-thread bounce
        buffer and the records are copied out and checked."""
        t0 = time.perf_counter()
        rb = record_bytes or self.record_bytes
        offs = np.asarray(offsets, np.int64)
        n = offs.size
        if n == 0:
            return
        lo = offs // ALIGN * ALIGN
        hi = np.minimum(-(-(offs + rb) // ALIGN) * ALIGN, -(-self.size // ALIGN) * ALIGN)
        reach = np.maximum.accumulate(hi)
        starts = [0]
        span_lo = int(lo[0])
        for j in np.flatnonzero(lo[1:] > reach[:-1] + self.merge_gap) + 1:  # gaps split the requests
            starts.append(int(j))
        starts.append(n)
        groups = []
        for g0, g1 in zip(starts[:-1], starts[1:], strict=True):  # also cap the span of one request
            a = g0
            span_lo = int(lo[g0])
            for k in range(g0 + 1, g1):
                if int(hi[k]) - span_lo > self.max_span:
                    groups.append((a, k))
                    a, span_lo = k, int(lo[k])
            groups.append((a, g1))
        if self._native is not None and "_preadv" not in self.__dict__:
            nbytes = 0
            for r0, r1, sub in self._batches(groups, lo, reach):  # the bounce buffer stays <= max_batch_bytes
                nbytes += self._read_native(offs[r0:r1], lo[r0:r1], reach[r0:r1], [(a - r0, b - r0) for a, b in sub],
                                            dests[r0:r1], None if crcs is None else crcs[r0:r1], rb)
            groups_n = len(groups)
        else:
            nbytes = self._read_python(offs, lo, reach, groups, dests, crcs, rb)
            groups_n = len(groups)
        with self._lock:
            self.bytes_read += nbytes
            self.requests += groups_n
            self.records += n
            self.io_seconds += time.perf_counter() - t0

    def _batches(self, groups: list, lo: np.ndarray, reach: np.ndarray):
        """Consecutive runs of requests whose spans add up to at most ``max_batch_bytes`` (at least one request
        each): ``(first record, end record, requests)``."""
        start, total = 0, 0
        for j, (a, b) in enumerate(groups):
            span = int(reach[b - 1] - lo[a])
            if j > start and total + span > self.max_batch_bytes:
                yield groups[start][0], groups[j - 1][1], groups[start:j]
                start, total = j, 0
            total += span
        yield groups[start][0], groups[-1][1], groups[start:]

    def _read_native(self, offs, lo, reach, groups, dests, crcs, rb: int) -> int:

        g0 = np.array([g[0] for g in groups], np.int64)
        g1 = np.array([g[1] for g in groups], np.int64)
        s0, s1 = lo[g0], reach[g1 - 1]
        span = s1 - s0
        pos = np.concatenate([[0], np.cumsum(span)[:-1]]).astype(np.int64)
        buf = self._bounce(int(span.sum()))
        base = buf.ctypes.data
        want = np.minimum(s1, self.size) - s0
        n = len(groups)
        dst = (ctypes.c_void_p * n)(*(base + pos).tolist())
        err_info = np.zeros(2, np.int64)
        p64 = ctypes.POINTER(ctypes.c_int64)
        off_a, len_a, want_a = (np.ascontiguousarray(a, np.int64) for a in (s0, span, want))
        args = (self.fd, n, off_a.ctypes.data_as(p64), len_a.ctypes.data_as(p64), want_a.ctypes.data_as(p64), dst,
                self.queue_depth, err_info.ctypes.data_as(p64))
        group_of = np.repeat(np.arange(n), (g1 - g0))
        src_addr = base + pos[group_of] + (offs - s0[group_of])
        pp = ctypes.POINTER(ctypes.c_void_p)
        m = len(offs)
        src_a, dst_a = np.ascontiguousarray(src_addr, np.uint64), _addresses(dests)
        src, dsts = src_a.ctypes.data_as(pp), dst_a.ctypes.data_as(pp)
        crc_a = None if crcs is None else np.ascontiguousarray(crcs, np.uint32)
        crc_p = None if crc_a is None else crc_a.ctypes.data_as(ctypes.POINTER(ctypes.c_uint32))
        err = -2
        if self.engine == "aio":  # records checked and copied out as their requests complete
            begin = np.ascontiguousarray(np.append(g0, g1[-1]), np.int64)
            err = self._native.xpuc_aio_batch_records(*args, begin.ctypes.data_as(p64), src, dsts, rb, crc_p)
            if err == -3:
                raise XpucError(f"{self.path}: record at offset {int(offs[int(err_info[0])])} fails its checksum "
                                "(corrupted flash file)")
        copied = err != -2
        if err == -2:  # native AIO unavailable (or not chosen): threads, from now on
            self.engine = "threads"
            err = self._native.xpuc_pread_batch(*args)
        if err == -1:
            raise XpucError(f"{self.path}: short read at offset {int(err_info[0])} ({int(err_info[1])} bytes; "
                            "file truncated?)")
        if err:
            raise XpucError(f"{self.path}: read error at offset {int(err_info[0])}: {os.strerror(err)}")
        if not self.direct:
            os.posix_fadvise(self.fd, int(s0.min()), int(s1.max() - s0.min()), os.POSIX_FADV_DONTNEED)
        if not copied:
            bad = self._native.xpuc_copy_records(m, src, dsts, rb, crc_p)
            if bad >= 0:
                raise XpucError(f"{self.path}: record at offset {int(offs[bad])} fails its checksum "
                                "(corrupted flash file)")
        return int(span.sum())

    def _read_python(self, offs, lo, reach, groups, dests, crcs, rb: int) -> int:
        nbytes = 0
        for g0, g1 in groups:
            s0, s1 = int(lo[g0]), int(reach[g1 - 1])
            buf = self._bounce(s1 - s0)
            want = min(s1, self.size) - s0
            if self.direct:
                self._read_exact_upto(memoryview(buf)[: s1 - s0], s0, want)
            else:
                self._read_exact(memoryview(buf)[:want], s0)
                os.posix_fadvise(self.fd, s0, want, os.POSIX_FADV_DONTNEED)
            for k in range(g0, g1):
                at = int(offs[k]) - s0
                rec = buf[at:at + rb]
                if crcs is not None and zlib.crc32(rec) != int(crcs[k]):
                    raise XpucError(f"{self.path}: record at offset {int(offs[k])} fails its checksum "
                                    "(corrupted flash file)")
                if isinstance(dests, RecordRows):
                    dests.row(k, rb)[:] = rec
                else:
                    dests[k].reshape(-1).view(np.uint8)[:] = rec
            nbytes += s1 - s0
        return nbytes

    def _read_exact_upto(self, span: memoryview, offset: int, want: int) -> None:
        """O_DIRECT read of the whole aligned ``span``; fewer bytes only at the end of the file."""
        try:
            got = self._preadv([span], offset)
        except OSError as e:
            raise XpucError(f"{self.path}: read error at offset {offset}: {e.strerror}") from None
        if got < want:
            raise XpucError(f"{self.path}: short read at offset {offset} ({got} of {want} bytes; file truncated?)")

    def submit(self, offsets: np.ndarray, dests: list[np.ndarray] | RecordRows, crcs: np.ndarray | None = None,
               record_bytes: int | None = None) -> Future:
        """Queue :meth:`read` on an I/O thread."""
        return self._pool.submit(self.read, offsets, dests, crcs, record_bytes)

    def read_span(self, offset: int, dest: np.ndarray) -> None:
        """Read ``dest.nbytes`` bytes from ``offset`` (streaming a layer, loading a hot segment): straight into
        ``dest`` when it is page-aligned with room to round the length up, else through the bounce buffer."""
        t0 = time.perf_counter()
        n = dest.nbytes
        out = dest.reshape(-1).view(np.uint8)
        addr = out.__array_interface__["data"][0]
        in_place = not self.direct or (offset % ALIGN == 0 and addr % ALIGN == 0
                                       and _room(out) >= -(-n // ALIGN) * ALIGN)
        room = np.frombuffer(_owner(out), np.uint8)[addr - _addr(_owner(out)):] if in_place and self.direct else out
        chunk, done, nreq = 8 << 20, 0, 0
        while done < n:
            c = min(n - done, chunk)
            if in_place and self.direct:
                full = -(-c // ALIGN) * ALIGN
                self._read_exact_upto(memoryview(room)[done:done + full], offset + done,
                                      min(c, self.size - offset - done))
            elif in_place:
                self._read_exact(memoryview(out)[done:done + c], offset + done)
            else:
                lo = (offset + done) // ALIGN * ALIGN
                hi = -(-(offset + done + c) // ALIGN) * ALIGN
                buf = self._bounce(hi - lo)
                self._read_exact_upto(memoryview(buf)[: hi - lo], lo, min(offset + done + c, self.size) - lo)
                out[done:done + c] = buf[offset + done - lo: offset + done - lo + c]
            done += c
            nreq += 1
        if not self.direct:
            os.posix_fadvise(self.fd, offset, n, os.POSIX_FADV_DONTNEED)
        with self._lock:
            self.requests += nreq
            self.bytes_read += n
            self.io_seconds += time.perf_counter() - t0

    # --- bookkeeping ------------------------------------------------------------------------------------
    def metrics(self) -> dict:
        return {"bytes_read": self.bytes_read, "requests": self.requests, "records": self.records,
                "io_seconds": self.io_seconds, "direct": self.direct, "native": self._native is not None,
                "engine": self.engine}

    def reset_counters(self) -> None:
        with self._lock:
            self.bytes_read = self.requests = self.records = 0
            self.io_seconds = 0.0

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> FlashReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
