"""The FlashReader's native helper (``batch_read.c``): compiled with the system C compiler on first use and
cached under ``$XPUC_CACHE/native``; ``None`` when no compiler is available (the reader then issues its
reads from Python threads)."""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path

from xpuc.runtime.artifact import cache_dir

SOURCE = Path(__file__).with_name("batch_read.c")


@cache
def batch_reader() -> ctypes.CDLL | None:

    if os.environ.get("XPUC_NO_NATIVE") == "1" or not SOURCE.is_file():
        return None
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        return None
    src = SOURCE.read_bytes()
    # keyed by the source and the machine: a cache shared with an emulated aarch64 run holds both builds
    out = cache_dir() / "native" / f"batch_read-{platform.machine()}-{hashlib.sha256(src).hexdigest()[:16]}.so"
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
        os.close(fd)
        r = subprocess.run([cc, "-O2", "-shared", "-fPIC", "-pthread", "-o", tmp, str(SOURCE)],
                           capture_output=True, text=True)
        if r.returncode != 0:
            os.unlink(tmp)
            return None
        os.replace(tmp, out)
    lib = ctypes.CDLL(str(out))
    p64 = ctypes.POINTER(ctypes.c_int64)
    pp = ctypes.POINTER(ctypes.c_void_p)
    lib.xpuc_pread_batch.argtypes = [ctypes.c_int, ctypes.c_int, p64, p64, p64, pp, ctypes.c_int, p64]
    lib.xpuc_pread_batch.restype = ctypes.c_int
    lib.xpuc_aio_batch.argtypes = lib.xpuc_pread_batch.argtypes
    lib.xpuc_aio_batch.restype = ctypes.c_int
    lib.xpuc_aio_batch_records.argtypes = [*lib.xpuc_pread_batch.argtypes, p64, pp, pp, ctypes.c_int64,
                                           ctypes.POINTER(ctypes.c_uint32)]
    lib.xpuc_aio_batch_records.restype = ctypes.c_int
    lib.xpuc_copy_records.argtypes = [ctypes.c_int, pp, pp, ctypes.c_int64, ctypes.POINTER(ctypes.c_uint32)]
    lib.xpuc_copy_records.restype = ctypes.c_int64
    lib.xpuc_crc32.argtypes = [ctypes.c_void_p, ctypes.c_int64]
    lib.xpuc_crc32.restype = ctypes.c_uint32
    return lib
