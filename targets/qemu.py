"""Run aarch64 builds on an x86 host under QEMU user-mode emulation.

Set-up (idempotent, cached under ``$XPUC_CACHE/arm64``):

1. an arm64 Python 3.11 sysroot: the Debian packages of ``python3.11`` and its dependencies for arm64,
   downloaded with a private apt configuration (the host's package sources, its own state and cache
   directories, an empty dpkg status) and unpacked with ``dpkg-deb -x`` — the host's dpkg state is
   never touched; the standard library is byte-compiled once so each start is fast;
2. aarch64 wheels of apache-tvm / apache-tvm-ffi / numpy installed into a folder with
   ``pip install --target … --platform manylinux_2_28_aarch64``; ``libtvm_compiler.so`` is deleted so
   that ``import tvm`` loads the runtime library only (≈2 s under emulation instead of 6–9 s).

Host tools needed (Debian): ``qemu-user-static gcc-aarch64-linux-gnu libc6-dev-arm64-cross``.
``QEMU_CPU`` selects the emulated core (default ``cortex-a76``: Armv8.2-A with dot product and fp16, the
feature set of a phone's Cortex-A55 little core, which QEMU 7.2 does not model by name) so that
instructions a phone lacks raise SIGILL instead of passing silently.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from importlib.metadata import version
from pathlib import Path

from xpuc.runtime.artifact import cache_dir
from xpuc.runtime.errors import XpucError

PY = "python3.11"
WHEELS = ["apache-tvm==0.27.0.post1", "apache-tvm-ffi==0.1.14.post1", "numpy", "ml_dtypes", "cloudpickle", "psutil",
          "safetensors", "threadpoolctl"]  # the last two: what the offloading runtime reads packed models with
DEFAULT_CPU = "cortex-a76"
HOST_TOOLS = ("qemu-aarch64-static", "aarch64-linux-gnu-gcc")


def arm_root() -> Path:

    return cache_dir() / "arm64"


def missing_host_tools() -> list[str]:
    return [t for t in HOST_TOOLS if shutil.which(t) is None]


def _run(cmd: list[str], env: dict | None = None, cwd: Path | None = None) -> None:
    r = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True)
    if r.returncode != 0:
        tail = (r.stderr or r.stdout).strip().splitlines()[-3:]
        raise XpucError(f"{' '.join(cmd[:3])} … failed: {' | '.join(tail)}")


def _apt_config(root: Path) -> Path:
    """A private apt configuration: the host's sources, arm64 only, own state/cache, empty status."""
    for sub in ("state/lists/partial", "cache/archives/partial", "etc"):
        (root / "apt" / sub).mkdir(parents=True, exist_ok=True)
    status = root / "apt" / "state" / "status"
    status.touch()
    conf = root / "apt" / "etc" / "apt.conf"
    conf.write_text("\n".join([
        'APT::Architecture "arm64";',
        'APT::Architectures { "arm64"; };',
        f'Dir::State "{root / "apt" / "state"}";',
        f'Dir::State::status "{status}";',
        f'Dir::Cache "{root / "apt" / "cache"}";',
        'Dir::Etc::sourcelist "/etc/apt/sources.list";',
        'Dir::Etc::sourceparts "/etc/apt/sources.list.d";',
        'Dir::Etc::trusted "/etc/apt/trusted.gpg";',
        'Dir::Etc::trustedparts "/etc/apt/trusted.gpg.d";',
        'Debug::NoLocking "true";',
        "",
    ]))
    return conf


def ensure_sysroot(quiet: bool = True) -> tuple[Path, Path]:
    """Build (once) and return (sysroot, site folder with the aarch64 wheels)."""
    root = arm_root()
    sysroot, site = root / "sysroot", root / "pyarm"
    stamp = root / "ready.json"
    stale = not stamp.is_file() or json.loads(stamp.read_text()).get("wheels") != WHEELS
    if not stale:
        return sysroot, site
    missing = missing_host_tools()
    if missing:
        raise XpucError(f"emulated ARM needs {', '.join(missing)} (Debian: apt-get install qemu-user-static "
                        "gcc-aarch64-linux-gnu libc6-dev-arm64-cross)")
    root.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, APT_CONFIG=str(_apt_config(root)), DEBIAN_FRONTEND="noninteractive")
    if not (sysroot / "usr" / "bin" / PY).exists():
        if not quiet:
            print("xpuc: building the arm64 Python sysroot …", file=sys.stderr)
        _run(["apt-get", "update", "-qq"], env)
        _run(["apt-get", "install", "-y", "-qq", "--download-only", "--no-install-recommends",
              PY, "libstdc++6", "libgcc-s1"], env)
        tmp = Path(tempfile.mkdtemp(dir=root, prefix="sysroot."))
        for deb in sorted((root / "apt" / "cache" / "archives").glob("*.deb")):
            _run(["dpkg-deb", "-x", str(deb), str(tmp)])
        subprocess.run([sys.executable, "-m", "compileall", "-q", "-j", "0",
                        str(tmp / "usr" / "lib" / PY)], capture_output=True)
        shutil.rmtree(sysroot, ignore_errors=True)
        os.replace(tmp, sysroot)
    if stale or not (site / "tvm").is_dir():
        if not quiet:
            print("xpuc: installing aarch64 wheels …", file=sys.stderr)
        tmp = Path(tempfile.mkdtemp(dir=root, prefix="pyarm."))
        _run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--target", str(tmp),
              "--platform", "manylinux_2_28_aarch64", "--platform", "manylinux2014_aarch64", "--python-version", "3.11",
              "--implementation", "cp", "--abi", "cp311", "--abi", "abi3", "--only-binary=:all:", *WHEELS])
        for lib in (tmp / "tvm" / "lib").glob("libtvm_compiler*.so"):
            lib.unlink()
        shutil.rmtree(site, ignore_errors=True)
        os.replace(tmp, site)
    stamp.write_text(json.dumps({"wheels": WHEELS}))
    return sysroot, site


def run_aarch64(script: str, args: list[str] | None = None, cpu: str = DEFAULT_CPU, timeout: float = 600,
                extra_path: list[Path] | None = None) -> subprocess.CompletedProcess:
    """Run a Python ``script`` (file path) with the emulated arm64 interpreter and TVM runtime."""
    return subprocess.run([*emulated_python(), script, *(args or [])], env=emulated_env(cpu, extra_path),
                          capture_output=True, text=True, timeout=timeout)


def xpuc_package(dest: Path) -> Path:
    """A folder for the emulated interpreter's path holding xpuc's device side: the ``xpuc.runtime`` package only.

    What runs on a device imports nothing of the compiler, the kernels' schedules or the targets (the layering
    that ``lint-imports`` checks), so the emulated device gets the runtime alone: a symlink to the installed
    sources (pure Python, arch-independent), and a ``dist-info`` that carries the installed version, so
    artifacts verify their xpuc version as they do on the host.
    """

    import xpuc.runtime

    pkg = Path(dest) / "xpuc"
    pkg.mkdir(parents=True, exist_ok=True)
    (pkg / "__init__.py").write_text("")
    link = pkg / "runtime"
    if not link.exists():
        link.symlink_to(Path(xpuc.runtime.__file__).parent, target_is_directory=True)
    v = version("xpuc")
    info = Path(dest) / f"xpuc-{v}.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: xpuc\nVersion: {v}\n")
    return Path(dest)


def emulated_python() -> list[str]:
    """The command line prefix that starts the arm64 interpreter under QEMU."""
    sysroot, _site = ensure_sysroot()
    return ["qemu-aarch64-static", str(sysroot / "usr" / "bin" / PY)]


def emulated_env(cpu: str = DEFAULT_CPU, extra_path: list[Path] | None = None) -> dict[str, str]:
    """Environment for :func:`emulated_python`: the arm64 sysroot and wheels, TVM's runtime library only."""
    sysroot, site = ensure_sysroot()
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONHOME", "LD_LIBRARY_PATH", "VIRTUAL_ENV", "PYTHONPATH")}
    env.update(PYTHONNOUSERSITE="1", TVM_USE_RUNTIME_LIB="1", QEMU_LD_PREFIX=str(sysroot), QEMU_CPU=cpu,
               PYTHONPATH=os.pathsep.join([str(site)] + [str(p) for p in extra_path or []]),
               PYTHONDONTWRITEBYTECODE="1")
    return env
