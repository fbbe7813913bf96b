"""Weights read once, straight into TVM tensors, with the file's digest computed over the bytes read."""

from __future__ import annotations

import hashlib
import json
import struct

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from xpuc.runtime.errors import XpucError
from xpuc.runtime.weights import load_tensors


@pytest.fixture
def weights(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {"embed": rng.standard_normal((7, 5)).astype(np.float32), "q": rng.integers(0, 255, (3, 34), np.uint8),
               "norm": rng.standard_normal(5).astype(np.float16), "ids": np.arange(4, dtype=np.int32),
               "empty": np.zeros((0, 3), np.float32)}
    path = tmp_path / "w.safetensors"
    save_file(tensors, str(path), metadata={"format": "xpuc-test"})
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


def test_tensors_equal_the_files_and_the_digest_is_checked(weights):
    path, digest = weights
    got = load_tensors(path, digest)
    ref = load_file(str(path))
    assert set(got) == set(ref)
    for name, arr in ref.items():
        assert str(got[name].dtype) == str(arr.dtype) and tuple(got[name].shape) == arr.shape
        np.testing.assert_array_equal(got[name].numpy(), arr)


@pytest.mark.parametrize("where", ["header", "first tensor", "last byte"])
def test_any_altered_byte_fails_the_digest(weights, where):
    path, digest = weights
    data = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    i = {"header": data.index(b"xpuc-test"), "first tensor": 8 + n + 1, "last byte": len(data) - 1}[where]
    data[i] ^= 0x01  # in the header: a letter of the metadata (still a valid header)
    path.write_bytes(bytes(data))
    with pytest.raises(XpucError, match=r"fails its checksum \(altered or corrupted\); repack"):
        load_tensors(path, digest, fix="repack")


def _rewrite_header(path, edit):
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    edit(header)
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])


@pytest.mark.parametrize("edit, message", [
    (lambda h: h["ids"].update(data_offsets=[0, 16]), "overlaps|size does not match"),
    (lambda h: h["ids"].update(shape=[5]), "size does not match"),
    (lambda h: h["ids"].update(dtype="F64"), "unsupported dtype"),
    (lambda h: h["ids"].update(data_offsets=[10**9, 10**9 + 16]), "past the end"),
    (lambda h: h.update(ids="x"), "corrupted safetensors header"),
])
def test_a_lying_header_is_refused_without_a_digest(weights, edit, message):
    """Bounds and sizes are checked before any read, so a file without a known digest cannot misplace data."""
    path, _ = weights
    _rewrite_header(path, edit)
    with pytest.raises(XpucError, match=message):
        load_tensors(path)


def test_truncated_file(weights):
    path, digest = weights
    path.write_bytes(path.read_bytes()[:-9])
    with pytest.raises(XpucError, match="truncated|past the end"):
        load_tensors(path, digest)
