"""Build llama.cpp natively from the sources vendored in the ``llama-cpp-python==0.3.36`` sdist (the peer).

    python benchmarks/llamacpp_build.py          # prints the bin directory and llama.cpp's system_info line

The build uses this CPU's native flags (``GGML_NATIVE=ON``), smoke-tested on a small generated GGUF. Some guests
report AMX (and more) but trap it: if llama.cpp dies of a signal it is rebuilt with AMX off, then, if it still
dies, with ``GGML_NATIVE=OFF`` and every SIMD extension the CPU reports switched on explicitly (AMX off).
The ``system_info`` line is printed and checked: on a CPU with AVX2 / AVX-512 the build
must say ``AVX2 = 1`` / ``AVX512 = 1`` (a build without them would flatter xpuc). Cached under ``--work``.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VERSION = "0.3.36"
TARGETS = ("llama-bench", "llama-completion", "llama-perplexity")
AMX_OFF = ("-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF")
# /proc/cpuinfo flag -> the GGML option that builds its kernels (GGML_NATIVE=OFF: each switched on explicitly)
SIMD = {"avx": "AVX", "avx2": "AVX2", "fma": "FMA", "f16c": "F16C", "bmi2": "BMI2", "avx_vnni": "AVX_VNNI",
        "avx512f": "AVX512", "avx512vbmi": "AVX512_VBMI", "avx512_vnni": "AVX512_VNNI", "avx512_bf16": "AVX512_BF16"}


def _cpu_flags() -> set[str]:
    p = Path("/proc/cpuinfo")
    return set(p.read_text().split()) if p.exists() else set()


def explicit_simd_flags() -> tuple[str, ...]:
    """Native-equivalent options without ``-march=native``: every SIMD extension the CPU reports, AMX off."""
    flags = _cpu_flags()
    return ("-DGGML_NATIVE=OFF", *(f"-DGGML_{v}={'ON' if k in flags else 'OFF'}" for k, v in SIMD.items()),
            *AMX_OFF)


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    print("$ " + " ".join(str(c) for c in cmd), flush=True)
    return subprocess.run(cmd, check=True, **kw)


def _sources(work: Path) -> Path:
    src = work / f"llama_cpp_python-{VERSION}" / "vendor" / "llama.cpp"
    if src.is_dir():
        return src
    sdist = work / f"llama_cpp_python-{VERSION}.tar.gz"
    if not sdist.is_file():
        _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q", "-d", str(work),
              f"llama-cpp-python=={VERSION}"])
    with tarfile.open(sdist) as t:
        t.extractall(work, filter="data")
    return src


def _build(src: Path, build: Path, extra: tuple[str, ...]) -> Path:
    if build.exists():
        shutil.rmtree(build)
    native = () if any(f.startswith("-DGGML_NATIVE") for f in extra) else ("-DGGML_NATIVE=ON",)
    _run(["cmake", "-S", str(src), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release", *native,
          "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_SERVER=OFF", *extra],
         stdout=subprocess.DEVNULL)
    _run(["cmake", "--build", str(build), "-j", str(os.cpu_count() or 2), "--target", *TARGETS],
         stdout=subprocess.DEVNULL)
    return build / "bin"


def system_info(bin_dir: Path, model: Path) -> tuple[int, str]:
    """(return code, llama.cpp's ``system_info:`` line) of a 4-token completion on ``model``."""
    r = subprocess.run([str(bin_dir / "llama-completion"), "-m", str(model), "-p", "hello", "-n", "4", "-t", "2",
                        "--no-warmup", "-no-cnv"], capture_output=True, text=True, errors="replace", timeout=300,
                       stdin=subprocess.DEVNULL)
    line = next((ln for ln in (r.stderr + r.stdout).splitlines() if "system_info" in ln), "")
    return r.returncode, line.strip()


def check_simd(info: str) -> None:
    flags = _cpu_flags()
    for cpu_flag, key in (("avx2", "AVX2"), ("avx512f", "AVX512"), ("avx512_vnni", "AVX512_VNNI")):
        if cpu_flag in flags and not re.search(rf"\b{key} = 1", info):
            raise SystemExit(f"llama.cpp was built without {key} on a CPU that has it: {info}")


def build_llamacpp(work: Path, smoke_model: Path) -> tuple[Path, str, list[str]]:
    """Build (or reuse) llama.cpp; returns (bin directory, system_info line, the extra cmake flags used)."""
    work.mkdir(parents=True, exist_ok=True)
    src = _sources(work)
    stamp = work / "build-flags.txt"
    bin_dir = work / "build" / "bin"
    if all((bin_dir / t).is_file() for t in TARGETS):  # built before (a native build when no flags were kept)
        extra = stamp.read_text().split() if stamp.is_file() else []
    else:
        extra = []
        bin_dir = _build(src, work / "build", ())
    rc, info = system_info(bin_dir, smoke_model)
    for fallback in (list(AMX_OFF), list(explicit_simd_flags())):
        if rc >= 0 or len(fallback) <= len(extra):
            continue
        # killed by a signal: some guests report AMX (or other extensions -march=native uses) but trap them
        print(f"build with flags {extra or 'native'} died of signal {-rc}: rebuilding with {fallback}", flush=True)
        extra = fallback
        bin_dir = _build(src, work / "build", tuple(extra))
        rc, info = system_info(bin_dir, smoke_model)
    if rc != 0:
        raise SystemExit(f"llama.cpp fails on {smoke_model} (exit {rc})")
    stamp.write_text(" ".join(extra))
    check_simd(info)
    return bin_dir, info, extra


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default=str(ROOT / ".cache" / "xpuc" / "llama.cpp"))
    args = ap.parse_args()
    work = Path(args.work)
    smoke = work / "smoke.gguf"
    if not smoke.is_file():
        from xpuc.compiler.synth_stream import synthesize_gguf

        work.mkdir(parents=True, exist_ok=True)
        synthesize_gguf("tiny", 0.9, 0, smoke)
    bin_dir, info, extra = build_llamacpp(work, smoke)
    print(bin_dir)
    print(info)
    print("extra cmake flags: " + (" ".join(extra) or "none"))


if __name__ == "__main__":
    main()
