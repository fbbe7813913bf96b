"""Build TIR kernels for the Hexagon NPU's HVX vector units (a shared object for the DSP).

TVM's normal ``tvm.compile`` with a Hexagon target silently builds for the host, so this lowers with the
Hexagon target as host, applies TVM's host finalize passes, calls ``target.build.hexagon`` and links the
object with ``ld.lld -shared``. This covers the HVX vector units, not the HTP tensor core (which needs
Qualcomm's QNN SDK). Nothing here can execute Hexagon code: callers check the ELF (machine QUALCOMM DSP6,
HVX instructions present) and run the same TIR on the host for the numbers.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from xpuc.compiler.errors import XpucError


def hvx_schedule(func, lanes: int = 32):
    """Vectorize the innermost loop of every data-parallel block by ``lanes`` fp32 (one 128-byte HVX
    vector). Reduction blocks (matmuls) are left scalar: their HVX schedule is not written yet."""
    import tvm

    sch = tvm.s_tir.Schedule(func)
    for block in sch.get_child_blocks(sch.get_sblock("root")) if _has_root(sch) else []:
        loops = sch.get_loops(block)
        if not loops:
            continue
        kinds = sch.get(block).iter_vars
        if any(iv.iter_type != 0 for iv in kinds):
            continue
        spatial = loops
        inner = spatial[-1]
        try:
            extent = int(sch.get(inner).extent)
        except TypeError:  # symbolic
            continue
        if extent % lanes == 0:
            _, vi = sch.split(inner, [None, lanes])
            sch.vectorize(vi)
    return sch.mod["main"]


def _has_root(sch) -> bool:
    try:
        sch.get_sblock("root")
        return True
    except Exception:
        return False


def _register_lld_linker(lld: str, linked: list[str]) -> None:
    """TVM's Hexagon codegen links through the global ``tvm.contrib.hexagon.link_shared``; route it to
    ld.lld (the Hexagon SDK's hexagon-link is not available here) and record the library it writes."""
    import tvm_ffi

    def link_shared(so_name, objs, extra_args=None):
        objs = [getattr(o, "value", o) for o in objs]
        r = subprocess.run([lld, "-shared", "-o", str(so_name), *map(str, objs)], capture_output=True, text=True)
        if r.returncode != 0:
            raise XpucError(f"ld.lld failed: {r.stderr.strip()[-300:]}")
        linked.append(str(so_name))
        return 0

    tvm_ffi.register_global_func("tvm.contrib.hexagon.link_shared", link_shared, override=True)


def build_hexagon(funcs: dict, arch: str, out: Path) -> Path:
    """Compile named PrimFuncs for ``qcom/hexagon-<arch>`` and link ``out`` (.so) with ld.lld."""
    import tvm
    from tvm.tirx import compilation_pipeline as cp

    lld = shutil.which("ld.lld")
    if lld is None:
        raise XpucError("ld.lld not found (Debian: apt-get install lld)")
    linked: list[str] = []
    _register_lld_linker(lld, linked)
    target = tvm.target.Target(f"qcom/hexagon-{arch}", host=f"qcom/hexagon-{arch}")
    mod = tvm.IRModule({n: f.with_attr("global_symbol", n).with_attr("target", target) for n, f in funcs.items()})
    with target:
        lower = cp.get_tir_pipeline("default")
        mod = (lower[0] if isinstance(lower, tuple) else lower)(mod)
        mod = cp.finalize_host_passes()(mod)
        tvm.get_global_func("target.build.hexagon")(mod, target)
    if not linked:
        raise XpucError("the Hexagon codegen produced no shared object")
    shutil.copyfile(linked[-1], out)
    return out
