"""The artifact directory: a versioned manifest, compiled modules, weights, tokenizer; verified on load."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from contextlib import contextmanager
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from xpuc.runtime.errors import XpucError
from xpuc.runtime.formats.manifest import (  # noqa: F401 - the artifact API re-exports the manifest model
    ARTIFACT_FORMAT,
    MANIFEST,
    MANIFEST_SCHEMA,
    Manifest,
    ModuleEntry,
    read_manifest,
    seal_manifest,
)

MANIFEST_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def cache_dir() -> Path:
    """xpuc's cache: ``$XPUC_CACHE``, else ``~/.cache/xpuc``."""
    return Path(os.environ.get("XPUC_CACHE", Path.home() / ".cache" / "xpuc"))


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    """SHA-256 of a file, read in 4 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def versions() -> dict[str, str]:

    import tvm

    def v(pkg: str) -> str:
        try:
            return version(pkg)
        except PackageNotFoundError:
            return "unknown"

    return {"xpuc": v("xpuc"), "tvm": tvm.__version__, "tvm_ffi": v("apache-tvm-ffi")}


def verify(path: Path, manifest: Manifest, check_versions: bool = True, also: tuple[str, ...] = (),
           fix: str = "recompile the model", streamed: tuple[str, ...] = ()) -> None:
    """Check versions and every file's SHA-256; raise XpucError on the first problem.

    The files that must be listed with a digest: tokenizer files that are present, the weights file, every
    module and module weights file, and ``also`` (what a kind's loader opens besides). ``streamed`` names files
    the loader checks as it reads them (:func:`xpuc.runtime.weights.load_tensors`): they must be listed and
    present, their digests are not computed here.
    """
    if check_versions:
        now = versions()
        for key in ("xpuc", "tvm"):
            if manifest.versions.get(key) != now[key]:
                raise XpucError(f"{path}: built with {key} {manifest.versions.get(key)}, this is {key} {now[key]}; "
                                f"{fix} with this xpuc")
    used = [t for t in MANIFEST_TOKENIZER_FILES if (path / t).exists()]  # read when present
    used += [manifest.weights_file] + [m.file for m in manifest.modules] + [m.weights for m in manifest.modules
                                                                          if m.weights]
    verify_files(path, manifest.files, fix, required=[u for u in [*used, *also, *streamed] if u], skip=streamed)


def member_path(path: Path, name: object) -> Path:
    """``path / name`` for a file named by a manifest, refusing any name that could leave the artifact.

    The name must be a relative, normalized POSIX path (no ``..``, no absolute path, no empty or ``.`` parts), and
    the file it names, symlinks resolved, must lie inside ``path``.
    """
    if not isinstance(name, str) or not name:
        raise XpucError(f"{path}: manifest names a file with a bad name ({name!r})")
    parts = name.split("/")
    if (name.startswith("/") or "\\" in name or ":" in parts[0] or "\0" in name
            or any(p in ("", ".", "..") for p in parts)):
        raise XpucError(f"{path}: manifest names a file outside the artifact ({name!r})")
    f = path / name
    root = path.resolve()
    if not f.resolve().is_relative_to(root):
        raise XpucError(f"{path}: '{name}' leads outside the artifact (a symbolic link)")
    return f


def verify_files(path: Path, files: dict[str, str], fix: str, required: list[str] = (),
                 skip: tuple[str, ...] = ()) -> None:
    """Every listed file exists and has its SHA-256; ``fix`` ends the error line (e.g. "recompile").

    ``required`` names the files the loader will open: each must be listed, so that no byte escapes the digests.
    ``skip``: listed files whose digest the loader checks while reading them (only their presence is checked).
    """
    if not isinstance(files, dict) or not files:
        raise XpucError(f"{path}: manifest lists no files and digests; {fix}")
    for name in required:
        if name not in files:
            raise XpucError(f"{path}: '{name}' is used but not listed with a digest in the manifest; {fix}")
    for name, digest in files.items():
        f = member_path(path, name)
        if not isinstance(digest, str):
            raise XpucError(f"{path}: manifest gives no digest for '{name}'; {fix}")
        if not f.is_file():
            raise XpucError(f"{path}: file '{name}' listed in the manifest is missing")
        if name not in skip and sha256_file(f) != digest:
            raise XpucError(f"{path}: file '{name}' fails its checksum (altered or corrupted); {fix}")


def check_output_file(path: str | os.PathLike) -> Path:
    """``path`` can be written as a file: its directory exists and it is not itself a directory.

    Commands call this before long work, so a typo in ``-o`` costs a second, not the whole run.
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise XpucError(f"{path.parent}: no such directory (create it first)")
    if path.is_dir():
        raise XpucError(f"{path}: is a directory; give a file name")
    return path


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ".part"):
    """Yield a temporary path next to ``path``; it becomes ``path`` only if the block succeeds.

    On any failure (an exception, a full disk, Ctrl-C) the temporary file is removed, so an output is either the
    complete new file or whatever was there before -- never half-written.
    """
    path = check_output_file(path)
    # unique per writer: two processes writing the same output never share a temporary file; the last rename wins
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}{suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


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
