"""``manifest.json``: the one manifest model of every artifact kind, validated field by field and sealed by a digest.

Kinds: ``llm`` (a compiled decoder with its tokenizer), ``graph`` (an imported ONNX graph) and ``packed`` (a model
for offloaded decoding: compiled decode and FFN modules, a fixed segment in memory, FFN records on flash). Every
field is checked against its type annotation when read (a list where a dict belongs, a string where a number
belongs, a missing or unknown key), and the manifest carries the SHA-256 of its own canonical JSON, so an edit of
any field -- a layer count of the config, a file name, a digest -- is refused before anything is loaded.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path

from xpuc.runtime.errors import XpucError

ARTIFACT_FORMAT = "xpuc-artifact"
MANIFEST_SCHEMA = 3  # 2: sealed by its own digest; 3: packed models use this manifest too (kind "packed")
MANIFEST = "manifest.json"
KINDS = ("llm", "graph", "packed")
DIGEST_KEY = "manifest_sha256"


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
class OffloadInfo:
    """What a packed model adds: the flash file's size, the fixed segment's format, the predictor, the model."""

    ffn_bytes: int
    fixed_dtype: str
    predictor_rank: int
    fingerprint: str  # ModelSpec.fingerprint of the packed model; its plan and profile must name the same
    sample_prompt: list[int] = field(default_factory=list)


@dataclass
class Manifest:
    """What an artifact holds and how to check it."""

    versions: dict[str, str]
    device: dict
    config: dict
    source: dict
    modules: list[ModuleEntry]
    params: list[dict]
    weights_file: str
    files: dict[str, str]
    format: str = ARTIFACT_FORMAT
    schema: int = MANIFEST_SCHEMA
    kind: str = "llm"  # one of KINDS
    io: dict = field(default_factory=dict)  # graph artifacts: {"inputs": [...], "outputs": [...]}
    offload: dict = field(default_factory=dict)  # packed models: an OffloadInfo

    def to_json(self) -> str:
        return json.dumps(seal_manifest(asdict(self)), indent=1)

    @classmethod
    def from_dict(cls, d: dict, where: str = MANIFEST) -> Manifest:
        """Validate ``d`` (types, required and unknown keys, kind) and build the manifest."""
        m = _build(cls, d, where)
        if m.kind not in KINDS:
            raise XpucError(f"{where}: unknown artifact kind {m.kind!r} (known: {', '.join(KINDS)})")
        if m.kind == "packed":
            _build(OffloadInfo, m.offload, f"{where}: offload")
        return m

    @property
    def offload_info(self) -> OffloadInfo:
        return _build(OffloadInfo, self.offload, f"{MANIFEST}: offload")


def _conforms(value, hint) -> bool:
    """Whether a JSON value has the annotated type (``str``, ``int``, ``dict[str, str]``, ``list[int]`` ...)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is list:
        return isinstance(value, list) and all(_conforms(v, args[0]) for v in value) if args else isinstance(value,
                                                                                                            list)
    if origin is dict:
        return isinstance(value, dict) and all(_conforms(k, args[0]) and _conforms(v, args[1])
                                               for k, v in value.items())
    if dataclasses.is_dataclass(hint):
        return isinstance(value, dict)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _build(cls, d, where: str):
    """``cls(**d)`` for a dataclass, after checking every key and type; nested dataclasses in lists too."""
    if not isinstance(d, dict):
        raise XpucError(f"{where}: malformed (expected an object, got {type(d).__name__}); rebuild the artifact")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - set(fields))
    if unknown:
        raise XpucError(f"{where}: malformed (unknown field '{unknown[0]}'); rebuild the artifact")
    args = {}
    for name, f in fields.items():
        if name not in d:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise XpucError(f"{where}: malformed (missing field '{name}'); rebuild the artifact")
            continue
        value, hint = d[name], hints[name]
        if not _conforms(value, hint):
            raise XpucError(f"{where}: malformed (field '{name}' is not {_describe(hint)}); rebuild the artifact")
        inner = typing.get_args(hint)
        if typing.get_origin(hint) is list and inner and dataclasses.is_dataclass(inner[0]):
            value = [_build(inner[0], v, f"{where}: {name}[{i}]") for i, v in enumerate(value)]
        args[name] = value
    return cls(**args)


def _describe(hint) -> str:
    origin = typing.get_origin(hint)
    if origin is list:
        return "a list"
    if origin is dict or hint is dict:
        return "an object"
    return {str: "a string", int: "an integer", float: "a number", bool: "true or false"}.get(hint, str(hint))


def manifest_digest(d: dict) -> str:
    """SHA-256 of a manifest's canonical JSON without its own digest: it covers the config and every field."""
    body = {k: v for k, v in d.items() if k != DIGEST_KEY}
    return hashlib.sha256(json.dumps(body, sort_keys=True, ensure_ascii=True).encode()).hexdigest()


def seal_manifest(d: dict) -> dict:
    """``d`` with its digest added (every writer of a manifest calls this last)."""
    return {**{k: v for k, v in d.items() if k != DIGEST_KEY}, DIGEST_KEY: manifest_digest(d)}


def read_manifest(path: Path, fix: str = "rebuild the artifact") -> Manifest:
    """The validated manifest of the artifact directory ``path`` (digest checked first)."""
    path = Path(path)
    mf = path / MANIFEST
    if not path.is_dir():
        raise XpucError(f"{path}: not an artifact directory")
    if not mf.is_file():
        raise XpucError(f"{path}: not an xpuc artifact (no {MANIFEST})")
    try:
        d = json.loads(mf.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise XpucError(f"{mf}: corrupted ({e})") from None
    if not isinstance(d, dict) or d.get("format") != ARTIFACT_FORMAT:
        raise XpucError(f"{mf}: not an xpuc manifest")
    if d.get("schema") != MANIFEST_SCHEMA:
        raise XpucError(f"{mf}: manifest schema {d.get('schema')} is not supported (expected {MANIFEST_SCHEMA}); "
                        f"{fix} with this xpuc")
    if d.get(DIGEST_KEY) != manifest_digest(d):
        raise XpucError(f"{mf}: the manifest was altered after it was written (its digest does not match); {fix}")
    return Manifest.from_dict({k: v for k, v in d.items() if k != DIGEST_KEY}, str(mf))
