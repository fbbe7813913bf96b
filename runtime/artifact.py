"""The artifact directory: a versioned manifest, compiled modules, weights, tokenizer; verified on load."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from xpuc.compiler.errors import XpucError

ARTIFACT_FORMAT = "xpuc-artifact"
MANIFEST_SCHEMA = 1
MANIFEST = "manifest.json"


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    import tvm

    def v(pkg: str) -> str:
        try:
            return version(pkg)
        except PackageNotFoundError:
            return "unknown"

    return {"xpuc": v("xpuc"), "tvm": tvm.__version__, "tvm_ffi": v("apache-tvm-ffi")}


@dataclass
class ModuleEntry:
    name: str
    file: str
    role: str
    target: str
    mtriple: str
    toolchain: str
    kernels: list[str] = field(default_factory=list)
    weights: str = ""  # weights file of this module ("" = the manifest's weights_file)
    info: dict = field(default_factory=dict)  # e.g. device kernel count and source size


@dataclass
class Manifest:
    """``manifest.json``: what an artifact holds and how to check it."""

    versions: dict
    device: dict
    config: dict
    source: dict
    modules: list[ModuleEntry]
    params: list[dict]
    weights_file: str
    files: dict[str, str]
    format: str = ARTIFACT_FORMAT
    schema: int = MANIFEST_SCHEMA
    kind: str = "llm"  # "llm" (decoder with tokenizer) or "graph" (an imported ONNX graph)
    io: dict = field(default_factory=dict)  # graph artifacts: {"inputs": [...], "outputs": [...]}

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_dict(cls, d: dict) -> Manifest:
        d = dict(d)
        d["modules"] = [ModuleEntry(**m) for m in d["modules"]]
        return cls(**d)


def read_manifest(path: Path) -> Manifest:
    mf = path / MANIFEST
    if not path.is_dir():
        raise XpucError(f"{path}: not an artifact directory")
    if not mf.is_file():
        raise XpucError(f"{path}: not an xpuc artifact (no {MANIFEST})")
    try:
        d = json.loads(mf.read_text())
    except json.JSONDecodeError as e:
        raise XpucError(f"{mf}: corrupted ({e})") from None
    if d.get("format") != ARTIFACT_FORMAT:
        raise XpucError(f"{mf}: not an xpuc manifest")
    if d.get("schema") != MANIFEST_SCHEMA:
        raise XpucError(f"{mf}: manifest schema {d.get('schema')} is not supported (expected {MANIFEST_SCHEMA}); "
                        "recompile the model")
    try:
        return Manifest.from_dict(d)
    except TypeError as e:
        raise XpucError(f"{mf}: malformed ({e})") from None


def verify(path: Path, manifest: Manifest, check_versions: bool = True) -> None:
    """Check versions and every file's SHA-256; raise XpucError on the first problem."""

    if check_versions:
        now = versions()
        for key in ("xpuc", "tvm"):
            if manifest.versions.get(key) != now[key]:
                raise XpucError(f"{path}: built with {key} {manifest.versions.get(key)}, this is {key} {now[key]}; "
                                "recompile the model with this xpuc")
    verify_files(path, manifest.files, "recompile")


def verify_files(path: Path, files: dict[str, str], fix: str) -> None:
    """Every listed file exists and has its SHA-256; ``fix`` ends the error line (e.g. "recompile")."""
    from xpuc.compiler.zoo import sha256_file

    for name, digest in files.items():
        f = path / name
        if not f.is_file():
            raise XpucError(f"{path}: file '{name}' listed in the manifest is missing")
        if sha256_file(f) != digest:
            raise XpucError(f"{path}: file '{name}' fails its checksum (altered or corrupted); {fix}")


@contextmanager
def staged_directory(output: Path, force: bool = False):
    """Yield a temporary directory next to ``output``; it becomes ``output`` only if the block succeeds."""
    output = Path(output)
    if output.exists() and not force:
        raise XpucError(f"{output}: already exists (use --force to replace it)")
    if output.exists() and not (output / MANIFEST).is_file():
        raise XpucError(f"{output}: exists and is not an xpuc artifact; refusing to replace it")
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".tmp", dir=output.parent))
    try:
        yield tmp
        if output.exists():
            old = output.with_name(f".{output.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(output, old)
            os.replace(tmp, output)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, output)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
