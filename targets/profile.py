"""Device profiles (data files in ``profiles/``) and the TVM targets and toolchains they imply."""

from __future__ import annotations

import json
import os
import platform
import shutil
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from xpuc.runtime.errors import XpucError
from xpuc.runtime.threads import usable_cores

PROFILE_SCHEMA = 1


@dataclass
class CoreCluster:
    cls: str
    core: str
    count: int
    ghz: float


@dataclass
class DeviceProfile:
    """What a device is: CPU clusters, GPU, NPU, memory and flash."""

    name: str
    description: str
    os: str
    mtriple: str
    mattr: list[str]
    clusters: list[CoreCluster]
    gpu: dict | None = None
    npu: dict | None = None
    memory: dict = field(default_factory=dict)
    flash: dict = field(default_factory=dict)

    @property
    def num_cores(self) -> int:
        return sum(c.count for c in self.clusters)

    @property
    def big_core(self) -> str:
        order = {"big": 0, "mid": 1, "little": 2}
        return sorted(self.clusters, key=lambda c: (order.get(c.cls, 3), -c.ghz))[0].core

    @property
    def is_host(self) -> bool:
        return self.name == "host"

    def cpu_target(self):
        """TVM target of the CPU (LLVM) with the fastest core's ``mcpu`` and the profile's features."""
        import tvm

        d = {"kind": "llvm", "mtriple": self.mtriple, "mcpu": self.big_core, "num-cores": self.num_cores}
        if self.mattr:
            d["mattr"] = list(self.mattr)
        return tvm.target.Target(d)

    def gpu_target(self):
        """TVM target of the GPU with this profile's CPU as host."""
        import tvm

        if not self.gpu:
            raise XpucError(f"device '{self.name}' has no GPU in its profile")
        if self.gpu["kind"] == "opencl":
            t = {"kind": "opencl", "device": self.gpu.get("device", "")}
        elif self.gpu["kind"] == "cuda":
            t = {"kind": "cuda", "arch": self.gpu.get("arch", "sm_80")}
        else:
            raise XpucError(f"device '{self.name}': GPU kind '{self.gpu['kind']}' is not supported")
        return tvm.target.Target(t, host=self.cpu_target())

    def npu_target(self):
        """TVM target of the NPU's vector units (Hexagon HVX)."""
        import tvm

        if not self.npu:
            raise XpucError(f"device '{self.name}' has no NPU in its profile")
        target = tvm.target.Target(f"qcom/hexagon-{self.npu['arch']}")
        return tvm.target.Target(target, host=target)  # the DSP runs its own host code

    def toolchain(self) -> Toolchain:
        return toolchain_for(self.mtriple)

    def summary(self) -> dict:
        return {
            "name": self.name, "os": self.os, "mtriple": self.mtriple, "mcpu": self.big_core,
            "cores": " + ".join(f"{c.count}x{c.core}@{c.ghz}" for c in self.clusters),
            "gpu": (self.gpu or {}).get("name", "-"), "npu": (self.npu or {}).get("name", "-"),
            "memory_gib": f"{self.memory.get('usable_gib', '?')}/{self.memory.get('total_gib', '?')}",
            "flash": self.flash.get("kind", "-"),
        }


@dataclass
class Toolchain:
    """How to link a TVM module into a shared library for a target triple."""

    name: str
    mtriple: str
    compiler: str | None
    options: list[str] = field(default_factory=list)

    def fcompile(self):
        """A ``fcompile`` for ``export_library`` (None = TVM's default host compiler)."""
        if self.name == "ndk":
            from tvm.support import ndk

            return ndk.create_shared
        if self.compiler is None:
            return None
        from tvm.support import cc

        return cc.cross_compiler(self.compiler, options=self.options)

    def available(self) -> bool:
        if self.name == "ndk":
            return bool(os.environ.get("TVM_NDK_CC"))
        return self.compiler is None or shutil.which(self.compiler) is not None


def toolchain_for(mtriple: str) -> Toolchain:
    """NDK when ``TVM_NDK_CC``/``ANDROID_NDK`` is set, else clang+lld (Android), gcc-cross (linux-arm64)."""
    if "android" in mtriple:
        if not os.environ.get("TVM_NDK_CC") and os.environ.get("ANDROID_NDK"):
            ndk = Path(os.environ["ANDROID_NDK"])
            cands = sorted(ndk.glob("toolchains/llvm/prebuilt/*/bin/aarch64-linux-android*-clang"))
            if cands:
                os.environ["TVM_NDK_CC"] = str(cands[-1])
        if os.environ.get("TVM_NDK_CC"):
            return Toolchain("ndk", mtriple, os.environ["TVM_NDK_CC"])
        return Toolchain("clang+lld", mtriple, "clang",
                         ["--target=aarch64-linux-android24", "-shared", "-fPIC", "-nostdlib", "-fuse-ld=lld"])
    if mtriple.startswith("aarch64") and platform.machine() != "aarch64":
        return Toolchain("gcc-cross", mtriple, "aarch64-linux-gnu-gcc")
    return Toolchain("system", mtriple, None)


def _host_profile() -> DeviceProfile:
    import psutil
    from tvm.target import codegen

    cpu = codegen.llvm_get_system_cpu()
    triple = codegen.llvm_get_system_triple()
    arch = platform.machine()
    triple = f"{arch}-linux-gnu" if "linux" in triple else triple
    total = psutil.virtual_memory().total / 2**30
    avail = psutil.virtual_memory().available / 2**30
    ghz = (psutil.cpu_freq().max / 1000.0) if psutil.cpu_freq() and psutil.cpu_freq().max else 0.0
    return DeviceProfile(
        name="host", description=f"this machine ({cpu}, detected)", os=platform.system().lower(),
        mtriple=triple, mattr=[], clusters=[CoreCluster("big", cpu, usable_cores(), round(ghz, 2))],
        memory={"total_gib": round(total, 1), "usable_gib": round(avail, 1)},
        flash=_host_flash())


def _host_flash() -> dict:
    """The host disk's measured read curve (``xpuc targets --measure-flash``), or a note that there is none."""
    from xpuc.targets.flash_curve import load_measured_curve

    curve = load_measured_curve()
    if curve is None:
        return {"kind": "host disk (not measured: xpuc targets --measure-flash PATH)"}
    return {"kind": f"host disk (measured {curve.measured_at[:10]}, {curve.engine})", "source": curve.file,
            "read_curve": curve.read_curve()}


def profile_names() -> list[str]:
    names = [p.name[:-5] for p in resources.files("xpuc.targets").joinpath("profiles").iterdir()
             if p.name.endswith(".json")]
    return ["host"] + sorted(names)


def load_profile(name: str) -> DeviceProfile:
    """Load a device profile by name (``host`` is detected) or from a JSON file path."""
    if name == "host":
        return _host_profile()
    path = Path(name)
    if path.suffix == ".json" and path.is_file():
        text = path.read_text()
    else:
        res = resources.files("xpuc.targets").joinpath("profiles", f"{name}.json")
        if not res.is_file():
            raise XpucError(f"unknown device '{name}' (known: {', '.join(profile_names())})")
        text = res.read_text()
    try:
        d = json.loads(text)
        if d.get("schema") != PROFILE_SCHEMA:
            raise XpucError(f"device profile '{name}': schema {d.get('schema')} is not {PROFILE_SCHEMA}")
        return DeviceProfile(
            name=d["name"], description=d.get("description", ""), os=d["os"], mtriple=d["cpu"]["mtriple"],
            mattr=list(d["cpu"].get("mattr", [])),
            clusters=[CoreCluster(c["class"], c["core"], int(c["count"]), float(c["ghz"]))
                      for c in d["cpu"]["clusters"]],
            gpu=d.get("gpu"), npu=d.get("npu"), memory=d.get("memory", {}), flash=d.get("flash", {}))
    except (KeyError, TypeError, ValueError) as e:
        raise XpucError(f"device profile '{name}' is malformed ({e})") from None
