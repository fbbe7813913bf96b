"""Read a safetensors file with plain reads (no mmap), so resident memory holds only the weights that were
read, not a mapped view of the whole file.

:func:`load_tensors` reads every byte of the file once, straight into the TVM tensors' memory, and computes the
file's SHA-256 over the same bytes (on a second thread, while the next tensor is read): the weights in use are
exactly the bytes that were checked, and the file is read once instead of twice (digest, then load).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from xpuc.runtime.errors import XpucError

_DTYPES = {"F16": np.float16, "F32": np.float32, "BF16": None, "I32": np.int32, "I64": np.int64,
           "U8": np.uint8, "I8": np.int8, "U16": np.uint16, "I16": np.int16, "U32": np.uint32}
_MAX_HEADER = 100 << 20  # safetensors' own limit


def _parse_header(path: Path, raw: bytes) -> dict:
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise XpucError(f"{path}: corrupted safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise XpucError(f"{path}: corrupted safetensors header (not an object)")
    header.pop("__metadata__", None)
    return header


def _header_length(path: Path, head: bytes) -> int:
    if len(head) != 8:
        raise XpucError(f"{path}: truncated safetensors file")
    (n,) = struct.unpack("<Q", head)
    if n > _MAX_HEADER:
        raise XpucError(f"{path}: corrupted safetensors header (claims {n} bytes)")
    return n


def read_header(path: Path) -> tuple[dict, int]:
    """The tensor table of a safetensors file (``name -> {dtype, shape, data_offsets}``) and where data starts."""
    with open(path, "rb") as f:
        n = _header_length(path, f.read(8))
        return _parse_header(path, f.read(n)), 8 + n


def _entry(path: Path, name: str, meta: object) -> tuple[np.dtype, tuple[int, ...], int, int]:
    """dtype, shape, start, end of one tensor, checked (known dtype, size matching its shape)."""
    try:
        dtype = _DTYPES.get(meta["dtype"])
        shape = tuple(int(s) for s in meta["shape"])
        start, end = (int(o) for o in meta["data_offsets"])
    except (TypeError, KeyError, ValueError):
        raise XpucError(f"{path}: corrupted safetensors header (entry '{name}')") from None
    if dtype is None:
        raise XpucError(f"{path}: tensor '{name}' has unsupported dtype {meta['dtype']}")
    if min(shape, default=0) < 0 or int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize != end - start:
        raise XpucError(f"{path}: tensor '{name}' size does not match its shape")
    return np.dtype(dtype), shape, start, end


def iter_tensors(path: Path, names: list[str]) -> Iterator[tuple[str, np.ndarray]]:
    """Yield ``(name, array)`` for ``names`` in that order, each read with one ``readinto``."""
    header, base = read_header(path)
    with open(path, "rb", buffering=0) as f:
        for name in names:
            meta = header.get(name)
            if meta is None:
                raise XpucError(f"{path}: tensor '{name}' is missing")
            dtype, shape, start, end = _entry(path, name, meta)
            arr = np.empty(shape, dtype=dtype)
            f.seek(base + start)
            if f.readinto(memoryview(arr).cast("B")) != arr.nbytes:
                raise XpucError(f"{path}: truncated while reading '{name}'")
            yield name, arr


def load_tensors(path: Path, digest: str | None = None, device=None, fix: str = "") -> dict:
    """Every tensor of a safetensors file as a TVM tensor on ``device`` (default: the CPU).

    The file is read from its first byte to its last, in order; on the CPU each tensor is read straight into the
    memory of its TVM tensor (one copy, from the kernel's page cache). With ``digest`` the SHA-256 of those same
    bytes is computed alongside and must equal it, else :class:`XpucError` and nothing is returned.

    Parameters
    ----------
    path:
        The safetensors file.
    digest:
        Its expected SHA-256 (hex), as listed in the artifact's manifest; ``None`` reads without checking.
    device:
        A TVM device; tensors for another device are staged through host memory one at a time.
    fix:
        Ends the checksum error line (e.g. "repack the model").
    """
    import tvm

    device = device or tvm.cpu()
    on_cpu = device.dlpack_device_type() == tvm.cpu().dlpack_device_type()
    sha = hashlib.sha256() if digest else None
    out: dict = {}
    pending: list = []
    with open(path, "rb", buffering=0) as f, ThreadPoolExecutor(1, thread_name_prefix="xpuc-digest") as hasher:

        def feed(data) -> None:  # hashed in file order on the one hasher thread (hashlib releases the GIL)
            if sha is not None:
                pending.append(hasher.submit(sha.update, data))

        size = os.fstat(f.fileno()).st_size
        head = f.read(8)
        raw = f.read(_header_length(path, head))
        header = _parse_header(path, raw)
        pos = base = 8 + len(raw)
        feed(head + raw)
        for name, meta in sorted(header.items(), key=lambda kv: _entry(path, kv[0], kv[1])[2]):
            dtype, shape, start, end = _entry(path, name, meta)
            if base + start < pos or base + end > size:
                raise XpucError(f"{path}: tensor '{name}' overlaps another or lies past the end of the file")
            if base + start > pos:  # padding between tensors: hashed, not kept
                feed(f.read(base + start - pos))
            t = tvm.runtime.empty(shape, str(dtype), device)
            host = np.from_dlpack(t) if on_cpu else np.empty(shape, dtype)
            if host.nbytes and f.readinto(memoryview(host.reshape(-1)).cast("B")) != host.nbytes:
                raise XpucError(f"{path}: truncated while reading '{name}'")
            feed(host.reshape(-1).view(np.uint8))
            if not on_cpu:
                t.copyfrom(host)
            out[name] = t
            pos = base + end
        if pos < size:  # trailing bytes are part of the file's digest too
            feed(f.read())
        for p in pending:
            p.result()
    if sha and sha.hexdigest() != digest:
        raise XpucError(f"{path}: fails its checksum (altered or corrupted)" + (f"; {fix}" if fix else ""))
    return out
