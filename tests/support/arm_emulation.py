"""Run TIR kernels built for the arm64 linux twin in one QEMU user-mode process and return their outputs."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np

from xpuc.runtime.errors import XpucError
from xpuc.targets.arm_build import QEMU_CPU, build_library, linux_twin_target
from xpuc.targets.qemu import run_aarch64


def run_emulated(funcs: dict, cases: list[dict], arrays: dict[str, np.ndarray], cpu: str = QEMU_CPU,
                 num_cores: int = 2) -> dict[str, np.ndarray]:
    """Build ``funcs`` for the linux twin, run ``cases`` in one emulated process, return the outputs."""
    with tempfile.TemporaryDirectory(prefix="xpuc-arm-") as d:
        d = Path(d)
        build_library(funcs, linux_twin_target(num_cores), d / "kernels.so")
        np.savez(d / "in.npz", **arrays)
        (d / "cases.json").write_text(json.dumps({"lib": str(d / "kernels.so"), "cases": cases}))
        runner = Path(__file__).with_name("arm_runner.py")
        r = run_aarch64(str(runner), [str(d / "cases.json"), str(d / "in.npz"), str(d / "out.npz")], cpu=cpu)
        if r.returncode != 0:
            raise XpucError(f"emulated run failed (exit {r.returncode}): {r.stderr.strip()[-500:]}")
        out = dict(np.load(d / "out.npz"))
    if str(out.pop("machine")) != "aarch64":
        raise XpucError("emulated run did not report aarch64")
    return out
