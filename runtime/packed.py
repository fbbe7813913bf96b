"""A packed model directory (`xpuc pack`) read and verified before anything of it is used."""

from __future__ import annotations

import json
import platform
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from xpuc.compiler.errors import XpucError
from xpuc.runtime.artifact import check_manifest_digest

OFFLOAD_FORMAT = "xpuc-offload"
OFFLOAD_SCHEMA = 3  # 3: sealed by its own digest, records the model fingerprint
FIXED_DTYPES = ("float16", "q8_0", "q4_0", "q4_1")
SMALL_FILES = ("fixed.safetensors", "ffn.crc32.npy", "flash.json", "plan.json", "profile.json",
               "predictor.safetensors")
MANIFEST = "offload.json"


def host_can_run(mtriple: str) -> bool:
    """Whether this machine executes code built for ``mtriple`` (same CPU architecture, not Android)."""
    arch = mtriple.split("-")[0]
    here = platform.machine().lower().replace("amd64", "x86_64").replace("arm64", "aarch64")
    return arch == here and "android" not in mtriple


@dataclass
class PackedModel:
    path: Path
    config: object
    flash: object
    plan: object
    stats: object
    crcs: np.ndarray
    fixed: dict
    sample_prompt: list[int]
    fixed_dtype: str
    modules: dict
    predictor_rank: int

    @property
    def predictor(self):
        """The trained predictor (for inspection and tests; the runtime runs its compiled copy)."""
        from xpuc.compiler.predictor import Predictor

        return Predictor.load(self.path / "predictor.safetensors")


def read_packed_manifest(path: Path) -> dict:
    mf = path / MANIFEST
    if not mf.is_file():
        raise XpucError(f"{path}: not a packed xpuc model (no {MANIFEST}; create one with `xpuc pack`)")
    try:
        d = json.loads(mf.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise XpucError(f"{mf}: corrupted ({e})") from None
    if not isinstance(d, dict) or d.get("format") != OFFLOAD_FORMAT or d.get("schema") != OFFLOAD_SCHEMA:
        raise XpucError(f"{mf}: not an xpuc offload manifest of schema {OFFLOAD_SCHEMA}; repack the model")
    check_manifest_digest(mf, d, "repack the model")
    mods = d.get("modules")
    if not isinstance(mods, dict) or not all(isinstance(mods.get(k), str) for k in ("decode", "ffn", "mtriple")):
        raise XpucError(f"{mf}: malformed (no compiled modules); repack the model")
    if not isinstance(d.get("ffn_bytes"), int) or d.get("fixed_dtype") not in FIXED_DTYPES:
        raise XpucError(f"{mf}: malformed (ffn_bytes / fixed_dtype); repack the model")
    sample = d.get("sample_prompt", [])
    if (not isinstance(d.get("versions"), dict) or not isinstance(d.get("config"), dict)
            or not isinstance(sample, list) or not all(isinstance(t, int) for t in sample)):
        raise XpucError(f"{mf}: malformed (versions / config / sample_prompt); repack the model")
    return d


def load_packed(path: Path, check_device: bool = True) -> PackedModel:
    """Verify versions, target and every digest, then read the small files (``ffn.bin`` stays on flash)."""
    from safetensors.numpy import load_file

    from xpuc.compiler.flash_layout import FlashLayout
    from xpuc.compiler.planner import Plan
    from xpuc.compiler.profiler import ProfileStats
    from xpuc.compiler.spec import ArchConfig
    from xpuc.runtime.artifact import member_path, verify_files, versions

    path = Path(path)
    d = read_packed_manifest(path)
    now = versions()
    for key in ("xpuc", "tvm"):
        got = d["versions"].get(key)
        if got != now[key]:
            raise XpucError(f"{path}: packed with {key} {got}, this is {key} {now[key]}; repack the model")
    mods = d["modules"]
    if check_device and not host_can_run(mods["mtriple"]):
        raise XpucError(f"{path}: compiled for {mods['mtriple']} ({mods.get('device')}); this machine is "
                        f"{platform.machine()} (copy it to the device, or pack with --device host)")
    verify_files(path, d["files"], "repack the model", required=[*SMALL_FILES, mods["decode"], mods["ffn"]])
    ffn = member_path(path, "ffn.bin")
    if not ffn.is_file() or ffn.stat().st_size != d["ffn_bytes"]:
        size = ffn.stat().st_size if ffn.is_file() else 0
        raise XpucError(f"{ffn}: {size} bytes, expected {d['ffn_bytes']} (truncated or replaced); repack the model")
    try:
        config = ArchConfig.from_dict(d["config"])
    except (TypeError, KeyError, ValueError) as e:
        raise XpucError(f"{path / MANIFEST}: malformed config ({e}); repack the model") from None
    plan, stats = Plan.load(path / "plan.json"), ProfileStats.load(path / "profile.json")
    fingerprint = d.get("fingerprint")
    if not isinstance(fingerprint, str) or plan.fingerprint != fingerprint or stats.fingerprint != fingerprint:
        raise XpucError(f"{path}: its plan, profile and manifest name different models (fingerprints "
                        f"{plan.fingerprint}, {stats.fingerprint}, {fingerprint}); repack the model")
    if mods.get("threads") != plan.compute_threads:
        raise XpucError(f"{path}: the FFN kernels were built for {mods.get('threads')} threads, the plan asks for "
                        f"{plan.compute_threads}; repack the model")
    return PackedModel(path, config, FlashLayout.load(path / "flash.json"), plan,
                       stats, np.load(path / "ffn.crc32.npy", allow_pickle=False),
                       load_file(str(path / "fixed.safetensors")), list(d.get("sample_prompt", [])),
                       d["fixed_dtype"], mods, int(d.get("predictor_rank", 0)))
