"""`xpuc compile --device oneplus-12`: one artifact with the Android CPU library and the OpenCL prefill
library, ELF-checked; phase dumps; profile/XPU mismatches are clear errors."""

from __future__ import annotations

import json
import os
import shutil

import pytest
from support.cli import assert_clean_error, compile_tiny, xpuc

pytestmark = pytest.mark.arm


def _require_toolchain():
    missing = [t for t in ("clang", "ld.lld", "llvm-readelf") if shutil.which(t) is None]
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"CI must provide {missing}")
        pytest.skip(f"missing {missing}")


@pytest.fixture(scope="module")
def android_artifact(tmp_path_factory):
    _require_toolchain()
    d = tmp_path_factory.mktemp("android")
    compile_tiny(d, "--device", "oneplus-12", "--debug-dump", str(d / "ir"))
    return d


def test_modules_and_manifest(android_artifact):
    from xpuc.targets.arm_build import inspect_elf

    art = android_artifact / "art"
    m = json.loads((art / "manifest.json").read_text())
    roles = {mod["name"]: mod for mod in m["modules"]}
    assert roles["model"]["role"] == "decode" and '"kind":"llvm"' in roles["model"]["target"]
    gpu = roles["prefill_gpu"]
    assert gpu["role"] == "prefill" and '"kind":"opencl"' in gpu["target"] and '"device":"adreno"' in gpu["target"]
    assert gpu["info"]["device_kernels"] >= 10 and any(k.startswith("matmul") for k in gpu["kernels"])
    for f in ("model.so", "prefill_gpu.so"):
        rep = inspect_elf(art / f)
        assert rep.is_aarch64 and rep.glibc_versions == [] and rep.exported_ffi, f
    assert b"__kernel void" in (art / "prefill_gpu.so").read_bytes()  # OpenCL source embedded
    r = xpuc("inspect", str(art))
    assert r.returncode == 0 and "prefill on opencl" in r.stdout and "device kernels" in r.stdout


def test_debug_dump_has_every_phase(android_artifact):
    for tag, phases in (("cpu", ["00_input", "01_dispatch", "02_attention", "03_conv", "04_fastmath", "05_pack",
                                 "06_legalize", "07_annotate", "08_fuse", "09_schedule"]),
                        ("prefill_gpu", ["00_input", "01_legalize", "02_annotate", "03_schedule"])):
        files = sorted(p.stem for p in (android_artifact / "ir" / tag).glob("*.py"))
        assert files == phases, (tag, files)
    assert "thread_binding" in (android_artifact / "ir" / "prefill_gpu" / "03_schedule.py").read_text()


def test_android_artifact_does_not_run_here(android_artifact):
    assert_clean_error(xpuc("run", str(android_artifact / "art"), "--prompt", "hi"), "compiled for aarch64")


def test_device_without_gpu(tmp_path, android_artifact):
    r = xpuc("compile", str(android_artifact / "tiny.gguf"), "-o", str(tmp_path / "o"), "--prefill-on", "gpu")
    assert_clean_error(r, "has no GPU")
    assert not (tmp_path / "o").exists()
