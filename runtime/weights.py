"""Read a safetensors file tensor by tensor with plain reads (no mmap), so resident memory holds only
the weights that were copied into TVM tensors, not a mapped view of the whole file."""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from xpuc.runtime.errors import XpucError

_DTYPES = {"F16": np.float16, "F32": np.float32, "BF16": None, "I32": np.int32, "I64": np.int64,
           "U8": np.uint8, "I8": np.int8}


def read_header(path: Path) -> tuple[dict, int]:
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise XpucError(f"{path}: truncated safetensors file")
        (n,) = struct.unpack("<Q", head)
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise XpucError(f"{path}: corrupted safetensors header ({e})") from None
    header.pop("__metadata__", None)
    return header, 8 + n


def iter_tensors(path: Path, names: list[str]) -> Iterator[tuple[str, np.ndarray]]:
    """Yield ``(name, array)`` for ``names`` in that order, each read with one ``readinto``."""
    header, base = read_header(path)
    with open(path, "rb", buffering=0) as f:
        for name in names:
            meta = header.get(name)
            if meta is None:
                raise XpucError(f"{path}: tensor '{name}' is missing")
            dtype = _DTYPES.get(meta["dtype"])
            if dtype is None:
                raise XpucError(f"{path}: tensor '{name}' has unsupported dtype {meta['dtype']}")
            start, end = meta["data_offsets"]
            arr = np.empty(meta["shape"], dtype=dtype)
            if arr.nbytes != end - start:
                raise XpucError(f"{path}: tensor '{name}' size does not match its shape")
            f.seek(base + start)
            if f.readinto(memoryview(arr).cast("B")) != arr.nbytes:
                raise XpucError(f"{path}: truncated while reading '{name}'")
            yield name, arr
