"""FlashReader's three ways of issuing a batch (native AIO on one queue, POSIX threads, Python) read the same
bytes, check the same checksums and report the same faults."""

from __future__ import annotations

import os
import zlib

import numpy as np
import pytest

from xpuc.runtime.errors import XpucError
from xpuc.runtime.flash_reader import FlashReader, aligned_empty
from xpuc.runtime.native import batch_reader

RECORD = 6912  # a 7B-shaped q4_0 neuron: not 4 KiB-aligned, so spans straddle pages
ENGINES = ["aio", "threads", "python"]


@pytest.fixture
def flash(tmp_path):
    rng = np.random.default_rng(3)
    data = rng.integers(0, 256, RECORD * 300, np.uint8)
    path = tmp_path / "ffn.bin"
    path.write_bytes(data.tobytes())
    crcs = np.array([zlib.crc32(data[i * RECORD:(i + 1) * RECORD]) for i in range(300)], np.uint32)
    return path, data, crcs


def _kernel_has_aio(fd: int) -> bool:
    """io_setup works here: one 4 KiB AIO read (of an O_DIRECT fd) does not answer 'unavailable' (-2)."""
    import ctypes

    buf = aligned_empty((4096,), "uint8")
    p64 = ctypes.POINTER(ctypes.c_int64)
    one = np.array([0], np.int64)
    size = np.array([4096], np.int64)
    info = np.zeros(2, np.int64)
    dst = (ctypes.c_void_p * 1)(buf.ctypes.data)
    return batch_reader().xpuc_aio_batch(fd, 1, one.ctypes.data_as(p64), size.ctypes.data_as(p64),
                                         size.ctypes.data_as(p64), dst, 1, info.ctypes.data_as(p64)) != -2


def _needs_native(engine):
    if engine != "python" and batch_reader() is None:
        pytest.skip("no C compiler for the native reader")


@pytest.mark.parametrize("engine", ENGINES)
def test_engines_read_the_same_records(flash, engine):
    _needs_native(engine)
    path, data, crcs = flash
    want = np.array(sorted({0, 1, 2, 7, 8, 150, 151, 299, *range(20, 90, 3)}))
    with FlashReader(path, RECORD, queue_depth=5, engine=engine) as r:
        dest = aligned_empty((len(want), RECORD), "uint8")
        r.read(want * RECORD, list(dest), crcs[want])
        m = r.metrics()
        expected = engine
        if engine == "aio" and not (r.direct and _kernel_has_aio(r.fd)):
            expected = "threads"  # AIO needs O_DIRECT and io_setup
        assert m["engine"] == expected
        assert m["records"] == len(want) and 0 < m["requests"] <= len(want)
    for k, j in enumerate(want):
        assert dest[k].tobytes() == data[j * RECORD:(j + 1) * RECORD].tobytes()


@pytest.mark.parametrize("engine", ENGINES)
def test_engines_report_a_corrupted_record(flash, engine):
    _needs_native(engine)
    path, _, crcs = flash
    with open(path, "r+b") as f:
        f.seek(40 * RECORD + 17)
        f.write(b"\x00\x01\x02")
    with FlashReader(path, RECORD, queue_depth=4, engine=engine) as r, \
            pytest.raises(XpucError, match=f"offset {40 * RECORD} fails its checksum"):
        want = np.arange(30, 50)
        r.read(want * RECORD, list(aligned_empty((len(want), RECORD), "uint8")), crcs[want])


@pytest.mark.parametrize("engine", ENGINES)
def test_engines_report_a_file_truncated_under_them(flash, engine):
    """The file shrinks after the reader opened it: a short read, said as one error, for every engine."""
    _needs_native(engine)
    path, _, crcs = flash
    with FlashReader(path, RECORD, queue_depth=8, engine=engine) as r:
        os.truncate(path, 200 * RECORD)
        want = np.arange(190, 300, 2)
        with pytest.raises(XpucError, match="short read"):
            r.read(want * RECORD, list(aligned_empty((len(want), RECORD), "uint8")), crcs[want])


def test_unknown_engine_is_refused(flash):
    with pytest.raises(XpucError, match="unknown I/O engine 'uring'"):
        FlashReader(flash[0], RECORD, engine="uring")


@pytest.mark.parametrize("engine", ["aio", "threads"])
def test_large_batches_are_issued_in_parts_that_bound_the_bounce_buffer(flash, engine):
    """A batch of ~2.6 MiB of spans through a 256 KiB cap: the same bytes, a bounce buffer of the 1 MiB minimum
    (without the cap it grows to the whole batch), counted in ``staging_bytes``."""
    _needs_native(engine)
    path, data, crcs = flash
    want = np.arange(0, 300, 1)
    sizes = {}
    for cap in (256 << 10, 1 << 30):
        with FlashReader(path, RECORD, queue_depth=8, engine=engine, max_span=64 << 10, max_batch_bytes=cap) as r:
            dest = aligned_empty((len(want), RECORD), "uint8")
            r.submit(want * RECORD, list(dest), crcs[want]).result()
            sizes[cap] = r.staging_bytes
        assert dest.tobytes() == data[:300 * RECORD].tobytes()
    assert sizes[256 << 10] == 1 << 20 and sizes[1 << 30] >= 300 * RECORD


@pytest.mark.parametrize("engine", ENGINES)
def test_engines_report_an_io_error_at_submission(flash, engine):
    """Fault injection under the reader: its descriptor replaced by a directory's, so every read (pread, AIO
    submission or preadv) fails with EISDIR; each engine raises one XpucError naming the offset, and the reader
    still closes cleanly."""
    _needs_native(engine)
    path, _, crcs = flash
    r = FlashReader(path, RECORD, queue_depth=4, engine=engine)
    real, chosen = r.fd, r.engine
    r.fd = os.open(path.parent, os.O_RDONLY)
    try:
        want = np.arange(10, 40)
        with pytest.raises(XpucError, match="read error at offset"):
            r.submit(want * RECORD, list(aligned_empty((len(want), RECORD), "uint8")), crcs[want]).result()
        assert r.engine == chosen  # the error is reported, not taken for "AIO unavailable"
    finally:
        r.close()  # closes the directory's descriptor
        os.close(real)
