"""A packed model directory (`xpuc pack`) read and verified before anything of it is used."""

from __future__ import annotations

import platform
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from xpuc.runtime.artifact import member_path, verify
from xpuc.runtime.errors import XpucError
from xpuc.runtime.formats.arch import ArchConfig
from xpuc.runtime.formats.flash import FlashLayout
from xpuc.runtime.formats.manifest import MANIFEST, Manifest, read_manifest
from xpuc.runtime.formats.plan import Plan
from xpuc.runtime.formats.predictor import Predictor
from xpuc.runtime.formats.profile_stats import ProfileStats
from xpuc.runtime.weights import load_tensors

FIXED_DTYPES = ("float16", "q8_0", "q4_0", "q4_1")
FIXED_FILE = "fixed.safetensors"
SMALL_FILES = (FIXED_FILE, "ffn.crc32.npy", "flash.json", "plan.json", "profile.json",
               "predictor.safetensors")


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
    crcs: np.ndarray  # (units, clusters, record parts) uint32
    fixed_digest: str
    sample_prompt: list[int]
    fixed_dtype: str
    modules: dict
    predictor_rank: int

    @property
    def predictor(self):
        """The trained predictor (for inspection and tests; the runtime runs its compiled copy)."""

        return Predictor.load(self.path / "predictor.safetensors")

    def load_fixed(self, device=None) -> dict:
        """The fixed segment (embedding, attention, LM head, predictor) as TVM tensors, its SHA-256 checked over
        the bytes read (:func:`xpuc.runtime.weights.load_tensors`)."""
        return load_tensors(self.path / FIXED_FILE, self.fixed_digest, device, fix="repack the model")


def read_packed_manifest(path: Path) -> Manifest:
    """The validated manifest of a packed model (kind ``packed``)."""
    if not (Path(path) / MANIFEST).is_file():
        raise XpucError(f"{path}: not a packed xpuc model (no {MANIFEST}; create one with `xpuc pack`)")
    m = read_manifest(Path(path), "repack the model")
    if m.kind != "packed":
        raise XpucError(f"{path}: not a packed xpuc model (a '{m.kind}' artifact; create one with `xpuc pack`)")
    if m.offload_info.fixed_dtype not in FIXED_DTYPES:
        raise XpucError(f"{path / MANIFEST}: malformed (fixed_dtype {m.offload_info.fixed_dtype!r}); repack the model")
    roles = {e.role: e for e in m.modules}
    if len(m.modules) != 2 or set(roles) != {"decode", "ffn"}:
        raise XpucError(f"{path / MANIFEST}: malformed (needs one decode and one ffn module); repack the model")
    return m


def load_packed(path: Path, check_device: bool = True) -> PackedModel:
    """Verify versions, target and every digest, then read the small files (``ffn.bin`` stays on flash; the fixed
    segment is read, and its digest checked, by :meth:`PackedModel.load_fixed`)."""
    path = Path(path)
    m = read_packed_manifest(path)
    info = m.offload_info
    roles = {e.role: e for e in m.modules}
    mtriple = roles["decode"].mtriple
    if check_device and not host_can_run(mtriple):
        raise XpucError(f"{path}: compiled for {mtriple} ({m.device.get('name')}); this machine is "
                        f"{platform.machine()} (copy it to the device, or pack with --device host)")
    verify(path, m, also=tuple(f for f in SMALL_FILES if f != FIXED_FILE), fix="repack the model",
           streamed=(FIXED_FILE,))
    ffn = member_path(path, "ffn.bin")
    if not ffn.is_file() or ffn.stat().st_size != info.ffn_bytes:
        size = ffn.stat().st_size if ffn.is_file() else 0
        raise XpucError(f"{ffn}: {size} bytes, expected {info.ffn_bytes} (truncated or replaced); repack the model")
    config = ArchConfig.from_dict(m.config)
    plan, stats = Plan.load(path / "plan.json"), ProfileStats.load(path / "profile.json")
    if plan.fingerprint != info.fingerprint or stats.fingerprint != info.fingerprint:
        raise XpucError(f"{path}: its plan, profile and manifest name different models (fingerprints "
                        f"{plan.fingerprint}, {stats.fingerprint}, {info.fingerprint}); repack the model")
    threads = roles["ffn"].info.get("threads")
    if threads != plan.compute_threads:
        raise XpucError(f"{path}: the FFN kernels were built for {threads} threads, the plan asks for "
                        f"{plan.compute_threads}; repack the model")
    modules = {"decode": roles["decode"].file, "ffn": roles["ffn"].file, "mtriple": mtriple,
               "target": roles["decode"].target, "toolchain": roles["decode"].toolchain, "threads": threads,
               "device": m.device.get("name")}
    flash = FlashLayout.load(path / "flash.json")
    crcs = np.load(path / "ffn.crc32.npy", allow_pickle=False)
    want = (config.ffn_units, flash.n_clusters, len(flash.part_bytes))
    if crcs.dtype != np.uint32 or crcs.reshape(*crcs.shape[:2], -1).shape != want:
        raise XpucError(f"{path / 'ffn.crc32.npy'}: {crcs.dtype} {crcs.shape}, expected uint32 "
                        f"{want if flash.split else want[:2]}; repack the model")
    return PackedModel(path, config, flash, plan, stats, crcs.reshape(want), m.files[FIXED_FILE],
                       list(info.sample_prompt), info.fixed_dtype, modules, info.predictor_rank)
