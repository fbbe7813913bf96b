"""Instruction mix of the sparse FFN kernels built for Android (their speed cannot be measured here).

Usage: python benchmarks/arm_instruction_mix.py [--device oneplus-12] [--out benchmarks/results/arm_mix.json]

Builds the fused sparse kernel of the TurboSparse-Mistral-7B FFN shape (d=4096, n=14336, C=32) for each
weight dtype (and q4_0 with int8 dot products where the CPU has them) with the device profile's CPU target and
toolchain, and counts instruction classes in the
disassembly (llvm-objdump): NEON floating-point vector ops, vector loads, widening conversions, integer
dot products, and scalar floating-point ops.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

CLASSES = {
    "neon_fp_arith": r"\b(fmla|fmls|fmul|fadd|fsub|fmax|faddp)\s+v\d+\.",
    "neon_load": r"\b(ld1|ldr|ldp)\s+(\{\s*)?q\d+|\bld1\s+\{v",
    "neon_convert": r"\b(fcvtl2?|ucvtf|scvtf|ushll2?|uxtl2?|sxtl2?)\s+v\d+\.",
    "neon_int": r"\b(and|ushr|sshr|shl|movi|dup)\s+v\d+\.",
    "sdot_udot": r"\b(sdot|udot|usdot)\b",
    "scalar_fp": r"\b(fmadd|fmul|fadd|fsub)\s+s\d+",
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="oneplus-12")
    ap.add_argument("--out", default="benchmarks/results/arm_mix.json")
    args = ap.parse_args()

    from xpuc.runtime.formats.bundle import BundleLayout
    from xpuc.schedules.sparse_ffn import int8_dot_isa, sparse_ffn_kernel
    from xpuc.targets.arm_build import android_target, build_library, inspect_elf
    from xpuc.targets.profile import load_profile

    profile = load_profile(args.device)
    target = android_target(profile)
    rows = []
    isa = int8_dot_isa(target)
    variants = [("float32", ""), ("float16", ""), ("q4_0", ""), ("q4_1", "")] + ([("q4_0", isa)] if isa else [])
    for dtype, int8 in variants:
        layout = BundleLayout("reglu", 4096, 14336, 32, dtype)
        with tempfile.TemporaryDirectory() as d:
            so = build_library({"ffn": sparse_ffn_kernel(layout, "fused", profile.num_cores, int8=int8)}, target,
                               Path(d) / "ffn.so")
            rep = inspect_elf(so)
            asm = subprocess.run(["llvm-objdump", "-d", "--mattr=+dotprod,+i8mm,+fullfp16", str(so)],
                                 capture_output=True, text=True).stdout
        counts = Counter({k: len(re.findall(p, asm)) for k, p in CLASSES.items()})
        dtype += f" int8 ({int8})" if int8 else ""
        rows.append({"dtype": dtype, "machine": rep.machine, "glibc_versions": rep.glibc_versions,
                     "exported": rep.exported_ffi, **counts})
        print(f"{dtype:8s} {rep.machine}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"device": args.device, "target": str(target), "kernels": rows}, indent=1))
    print(f"written {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
