"""Versioned JSON files (profiles, plans): written atomically, read with a clear error."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from xpuc.runtime.artifact import atomic_path
from xpuc.runtime.errors import XpucError


def write_json_atomic(path: str | os.PathLike, obj) -> Path:
    """Write ``obj`` as JSON to ``path`` through a temporary file and a rename (never half-written)."""

    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj))
    return Path(path)


def read_versioned(path: str | os.PathLike, schema: int, what: str) -> dict:
    """Read a JSON object whose ``schema`` field must equal ``schema``; ``what`` names it in errors."""
    try:
        d = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise XpucError(f"{path}: not a readable xpuc {what} ({type(e).__name__})") from None
    if not isinstance(d, dict) or d.get("schema") != schema:
        got = d.get("schema") if isinstance(d, dict) else None
        raise XpucError(f"{path}: {what} schema {got} is not {schema}")
    return d


class JsonRecord:
    """``save`` / ``load`` of a versioned data class stored as one JSON object.

    A subclass (a dataclass with a ``schema`` field) sets ``SCHEMA`` (the version it reads) and ``WHAT`` (its name
    in errors), and overrides ``_from_json`` when nested records need building.
    """

    SCHEMA = 0
    WHAT = "record"

    def save(self, path: str | os.PathLike) -> Path:

        return write_json_atomic(path, dataclasses.asdict(self))

    @classmethod
    def _from_json(cls, d: dict):
        return cls(**d)

    @classmethod
    def load(cls, path: str | os.PathLike):
        d = read_versioned(path, cls.SCHEMA, cls.WHAT)
        try:
            return cls._from_json(d)
        except (TypeError, KeyError, AttributeError):
            raise XpucError(f"{path}: not a readable xpuc {cls.WHAT} (unexpected fields)") from None
        except ValueError as e:
            raise XpucError(f"{path}: malformed xpuc {cls.WHAT} ({e})") from None
