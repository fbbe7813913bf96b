"""`xpuc fetch` never returns a cached model file that fails its pinned digest."""

from __future__ import annotations

import os
import subprocess

import pytest
from support.cli import XPUC

from xpuc.compiler.zoo import ZOO
from xpuc.runtime.artifact import sha256_file


@pytest.mark.parametrize("damage", ["flipped_byte", "truncated", "emptied"])
def test_fetch_replaces_a_damaged_cached_model(smollm2_path, tmp_path, damage):
    m = ZOO["smollm2-135m"]
    wheel = smollm2_path.parent.parent / "wheels" / m.wheel
    assert wheel.is_file()
    cache = tmp_path / "cache"
    (cache / "wheels").mkdir(parents=True)
    (cache / "models").mkdir()
    os.symlink(wheel, cache / "wheels" / m.wheel)  # the verified wheel, so nothing is downloaded
    cached = cache / "models" / smollm2_path.name
    if damage == "flipped_byte":
        data = bytearray(smollm2_path.read_bytes())
        data[len(data) // 2] ^= 0x01
        cached.write_bytes(bytes(data))
    else:
        with open(smollm2_path, "rb") as f:
            cached.write_bytes(f.read(1024 if damage == "truncated" else 0))
    env = dict(os.environ, XPUC_CACHE=str(cache))
    r = subprocess.run([*XPUC, "fetch", "smollm2-135m"], capture_output=True, text=True,
                       env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(cached)
    assert "does not match its pinned digest" in r.stderr
    assert sha256_file(cached) == m.member_sha256
    assert not list((cache / "models").glob("*.part"))
