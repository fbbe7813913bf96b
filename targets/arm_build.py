"""Build TIR kernels for aarch64 (linux-gnu twin for emulation, Android for devices) and inspect them."""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from xpuc.runtime.errors import XpucError
from xpuc.targets.profile import DeviceProfile, Toolchain, toolchain_for

# The linux twin is compiled for a phone's little core (Cortex-A55: Armv8.2-A with dot product and fp16
# arithmetic) and run on QEMU's Cortex-A76 model, the Armv8.2-A core with the same features that QEMU
# 7.2 provides (it has no A55 model). Instructions beyond that set (SVE, i8mm, …) raise SIGILL.
EMULATED_CORE = "cortex-a55"
EMULATED_MATTR = ["+neon", "+dotprod", "+fullfp16"]
QEMU_CPU = "cortex-a76"


def linux_twin_target(num_cores: int = 2):
    """aarch64-linux-gnu target matching the emulated little core: runs under ``QEMU_CPU=cortex-a55``."""
    import tvm

    return tvm.target.Target({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": EMULATED_CORE,
                              "mattr": EMULATED_MATTR, "num-cores": num_cores})


def android_target(profile: DeviceProfile):
    """The profile's CPU target (big core ``mcpu``, its ``mattr``) for aarch64-linux-android."""
    return profile.cpu_target()


def build_library(funcs: dict, target, out: Path, toolchain: Toolchain | None = None) -> Path:
    """Compile named PrimFuncs into one shared library for ``target``."""
    import tvm

    mtriple = str(target.attrs.get("mtriple", ""))
    toolchain = toolchain or toolchain_for(mtriple)
    if not toolchain.available():
        raise XpucError(f"toolchain '{toolchain.name}' ({toolchain.compiler}) not found for {mtriple}")
    mod = tvm.IRModule({name: f.with_attr("global_symbol", name) for name, f in funcs.items()})
    lib = tvm.compile(mod, target=target)
    lib.export_library(str(out), fcompile=toolchain.fcompile())
    return out


@dataclass
class ElfReport:
    machine: str
    glibc_versions: list[str]
    exported_ffi: list[str]
    undefined: list[str]
    neon_fp_ops: int
    sdot: int

    @property
    def is_aarch64(self) -> bool:
        return "AArch64" in self.machine


def inspect_elf(path: Path) -> ElfReport:
    """Read an aarch64 shared object with llvm-readelf/llvm-objdump (or the binutils cross tools)."""
    def tool(*names: str) -> str:

        for n in names:
            if shutil.which(n):
                return n
        raise XpucError(f"none of {', '.join(names)} found (apt-get install llvm or binutils-aarch64-linux-gnu)")

    readelf = tool("llvm-readelf", "aarch64-linux-gnu-readelf", "readelf")
    objdump = tool("llvm-objdump", "aarch64-linux-gnu-objdump")
    header = subprocess.run([readelf, "-h", str(path)], capture_output=True, text=True).stdout
    machine = next((ln.split(":", 1)[1].strip() for ln in header.splitlines() if "Machine:" in ln), "?")
    syms = subprocess.run([readelf, "--dyn-syms", "-W", str(path)], capture_output=True, text=True).stdout
    versions = sorted(set(re.findall(r"@(GLIBC_[0-9.]+)", syms)))
    exported, undefined = [], []
    for ln in syms.splitlines():
        parts = ln.split()
        if len(parts) >= 8 and parts[0].endswith(":"):
            name = parts[7].split("@")[0]
            (undefined if parts[6] == "UND" else exported).append(name)
    # llvm-objdump decodes the dot-product and int8-matmul extensions only when asked to
    decode = ["--mattr=+dotprod,+i8mm,+fullfp16"] if objdump == "llvm-objdump" else []
    asm = subprocess.run([objdump, "-d", *decode, str(path)], capture_output=True, text=True).stdout
    neon = len(re.findall(r"\b(fmla|fmul|fadd|fcvtl2?|ld1|ucvtf|scvtf)\s+v\d+\.", asm))
    sdot = len(re.findall(r"\bsdot\b", asm))
    return ElfReport(machine, versions, sorted(n for n in exported if n.startswith("__tvm_ffi")),
                     sorted(set(n for n in undefined if n)), neon, sdot)
