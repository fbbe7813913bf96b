"""FlashReader: reads neuron-cluster records from the flash file into cache slots.

* ``O_DIRECT`` when the filesystem allows it and the records are 4 KiB-aligned, so the page cache cannot
  hide the I/O; otherwise buffered reads followed by ``posix_fadvise(DONTNEED)`` (the pages are dropped
  after each read) — ``metrics()["direct"]`` says which.
* Adjacent records go out as one ``preadv`` that scatters them into their (non-adjacent) slots.
* Reads are issued by ``io_threads`` dedicated threads; :meth:`submit` returns a future per batch, so
  the caller computes on what has arrived while later batches are in flight.
* Every record's CRC-32 is checked after the read; a short read (truncated file), an OS error or a
  checksum mismatch raises :class:`~xpuc.compiler.errors.XpucError`.
"""

from __future__ import annotations

import mmap
import os
import threading
import time
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np

from xpuc.compiler.errors import XpucError

ALIGN = 4096


def aligned_empty(shape: tuple[int, ...], dtype: str) -> np.ndarray:
    """A page-aligned, writable numpy array (anonymous mmap): valid O_DIRECT target, zero-copy for TVM."""
    n = int(np.prod(shape)) * np.dtype(dtype).itemsize
    buf = mmap.mmap(-1, max(n, ALIGN))
    return np.frombuffer(buf, dtype=dtype, count=int(np.prod(shape))).reshape(shape)


class FlashReader:
    """Reads fixed-size records at known offsets of one file.

    Parameters
    ----------
    path:
        The flash file (``ffn.bin``).
    record_bytes:
        Size of one record (a neuron cluster).
    crc:
        Optional ``{key: expected crc32}`` lookup given per request (see :meth:`read`).
    io_threads:
        Threads issuing reads.
    direct:
        Try ``O_DIRECT`` (only used when records and offsets are 4 KiB multiples).
    """

    def __init__(self, path: str | os.PathLike, record_bytes: int, io_threads: int = 1, direct: bool = True,
                 max_merge: int = 16) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise XpucError(f"{self.path}: flash file missing")
        self.record_bytes = record_bytes
        self.max_merge = max_merge
        self.direct = False
        flags = os.O_RDONLY
        if direct and record_bytes % ALIGN == 0 and hasattr(os, "O_DIRECT"):
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
        self._pool = ThreadPoolExecutor(max_workers=max(1, io_threads), thread_name_prefix="xpuc-io")
        self._lock = threading.Lock()
        self.bytes_read = 0
        self.requests = 0
        self.records = 0
        self.io_seconds = 0.0  # summed over reads (busy time of the I/O threads)

    # --- reads ------------------------------------------------------------------------------------------
    def _preadv(self, bufs: list[memoryview], offset: int) -> int:
        return os.preadv(self.fd, bufs, offset)

    def read(self, offsets: np.ndarray, dests: list[np.ndarray], crcs: np.ndarray | None = None) -> None:
        """Read records at ``offsets`` (sorted) into ``dests`` (one array of ``record_bytes`` each)."""
        t0 = time.perf_counter()
        n = len(offsets)
        i = 0
        nbytes = nreq = 0
        while i < n:
            j = i + 1
            while j < n and j - i < self.max_merge and offsets[j] == offsets[j - 1] + self.record_bytes:
                j += 1
            bufs = [memoryview(dests[k]).cast("B") for k in range(i, j)]
            want = (j - i) * self.record_bytes
            try:
                got = self._preadv(bufs, int(offsets[i]))
            except OSError as e:
                raise XpucError(f"{self.path}: read error at offset {int(offsets[i])}: {e.strerror}") from None
            if got != want:
                raise XpucError(f"{self.path}: short read at offset {int(offsets[i])} ({got} of {want} bytes; "
                                "file truncated?)")
            if not self.direct:
                os.posix_fadvise(self.fd, int(offsets[i]), want, os.POSIX_FADV_DONTNEED)
            if crcs is not None:
                for k in range(i, j):
                    if zlib.crc32(dests[k]) != int(crcs[k]):
                        raise XpucError(f"{self.path}: record at offset {int(offsets[k])} fails its checksum "
                                        "(corrupted flash file)")
            nbytes += want
            nreq += 1
            i = j
        with self._lock:
            self.bytes_read += nbytes
            self.requests += nreq
            self.records += n
            self.io_seconds += time.perf_counter() - t0

    def submit(self, offsets: np.ndarray, dests: list[np.ndarray], crcs: np.ndarray | None = None) -> Future:
        """Queue :meth:`read` on an I/O thread."""
        return self._pool.submit(self.read, offsets, dests, crcs)

    def read_span(self, offset: int, dest: np.ndarray) -> None:
        """One large read of ``dest.nbytes`` bytes (streaming a whole layer); counted like the others."""
        t0 = time.perf_counter()
        mv = memoryview(dest).cast("B")
        done = 0
        while done < mv.nbytes:
            chunk = min(mv.nbytes - done, 8 << 20)
            try:
                got = self._preadv([mv[done:done + chunk]], offset + done)
            except OSError as e:
                raise XpucError(f"{self.path}: read error at offset {offset + done}: {e.strerror}") from None
            if got != chunk:
                raise XpucError(f"{self.path}: short read at offset {offset + done} ({got} of {chunk} bytes; "
                                "file truncated?)")
            done += chunk
            with self._lock:
                self.requests += 1
        if not self.direct:
            os.posix_fadvise(self.fd, offset, mv.nbytes, os.POSIX_FADV_DONTNEED)
        with self._lock:
            self.bytes_read += mv.nbytes
            self.io_seconds += time.perf_counter() - t0

    # --- bookkeeping ------------------------------------------------------------------------------------
    def metrics(self) -> dict:
        return {"bytes_read": self.bytes_read, "requests": self.requests, "records": self.records,
                "io_seconds": self.io_seconds, "direct": self.direct}

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
