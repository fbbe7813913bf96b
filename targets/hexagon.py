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

from xpuc.runtime.errors import XpucError


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


#: Math intrinsics whose LLVM lowering fails for Hexagon in TVM 0.27 ("Cannot find intrinsic declaration");
#: they become calls of the C library's functions (``expf`` …), which the DSP's runtime provides.
LIBM_FUNCTIONS = ("exp", "exp2", "exp10", "log", "log2", "log10", "log1p", "sqrt", "pow", "tanh", "erf", "sin",
                  "cos", "tan", "atan", "floor", "ceil", "trunc", "round", "nearbyint", "fabs", "fmod")


def _split_dtype(dtype: str) -> tuple[str, int]:
    base, _, lanes = dtype.partition("x")
    return base, int(lanes) if lanes else 1


def _libm_call(name: str, dtype: str, args: list):
    """``name(args)`` as C calls; a vector call becomes one scalar call per lane, reassembled."""
    from tvm import tirx

    base, lanes = _split_dtype(dtype)
    fn = name + ("f" if base == "float32" else "")
    if lanes == 1:
        return tirx.call_pure_extern(base, fn, *args)
    lane = [tirx.IntImm("int32", i) for i in range(lanes)]

    def at(a, i):
        return tirx.Shuffle([a], [lane[i]]) if _split_dtype(str(a.ty.dtype))[1] > 1 else a

    return tirx.Shuffle([tirx.call_pure_extern(base, fn, *[at(a, i) for a in args]) for i in range(lanes)], lane)


_ROUTED: list[bool] = []


def route_math_to_libm() -> None:
    """Register Hexagon lowering rules: math intrinsics -> C library calls (per lane for vectors), sigmoid ->
    ``1 / (1 + expf(-x))``. Registered once per process."""
    import tvm
    from tvm import tirx

    if _ROUTED:
        return
    _ROUTED.append(True)

    def rule_for(name: str):
        def rule(call):
            return _libm_call(name, str(call.ty.dtype), list(call.args))
        return rule

    def sigmoid(call):
        dtype = str(call.ty.dtype)
        base, lanes = _split_dtype(dtype)
        one = tirx.FloatImm(base, 1.0)
        one = tirx.Broadcast(one, lanes) if lanes > 1 else one
        return one / (one + _libm_call("exp", dtype, [-call.args[0]]))

    for name in LIBM_FUNCTIONS:
        try:
            op = tvm.ir.Op.get(f"tirx.{name}")
        except Exception:  # an op this TVM does not define
            continue
        op.set_attr("hexagon.FLowerIntrinsic", rule_for(name), 100)
    tvm.ir.Op.get("tirx.sigmoid").set_attr("hexagon.FLowerIntrinsic", sigmoid, 100)


def _compile_tir(mod, target):
    """Default TIR pipeline, host finalize passes, Hexagon codegen (the kernels' runtime module)."""
    import tvm
    from tvm.tirx import compilation_pipeline as cp

    route_math_to_libm()
    with target:
        lower = cp.get_tir_pipeline("default")
        mod = (lower[0] if isinstance(lower, tuple) else lower)(mod)
        mod = cp.finalize_host_passes()(mod)
        return tvm.get_global_func("target.build.hexagon")(mod, target)


def build_relax_hexagon(mod, target):
    """A lowered and scheduled Relax module -> VM executable whose host code and kernels are Hexagon's.

    ``tvm.compile`` treats Hexagon as a device and fails (unlowered ``tvm_call_packed``), so this runs its
    steps with the Hexagon target as host: VM lowering, VM code generation, TIR lowering with the host
    finalize passes, Hexagon codegen (linked by ld.lld), VM link. Export the result with
    :func:`hexagon_fcompile`.
    """
    import tvm
    from tvm import relax
    from tvm.relax.vm_build import VMExecutable, _ffi_api, _filter_tir, _vmcodegen

    lld = shutil.which("ld.lld")
    if lld is None:
        raise XpucError("ld.lld not found (Debian: apt-get install lld)")
    _register_lld_linker(lld, [])
    with target:
        mod = relax.pipeline.default_build_pipeline()(mod)
    builder = relax.ExecBuilder()
    mod = _vmcodegen(builder, mod, "bytecode")
    tir = _filter_tir(mod)
    lib = None
    if tir is not None:
        tir = tvm.IRModule({gv: f.with_attr("target", target) for gv, f in tir.functions.items()})
        lib = _compile_tir(tir, target)
    return VMExecutable(_ffi_api.VMLink(builder, target, lib, [], {}))


def hexagon_fcompile():
    """``fcompile`` for ``export_library``: the packed-module blob (C) compiled by clang for Hexagon, all
    objects linked by ld.lld into one Hexagon shared object."""
    clang, lld = shutil.which("clang"), shutil.which("ld.lld")
    if clang is None or lld is None:
        raise XpucError("clang and ld.lld are needed for the Hexagon library (Debian: apt-get install clang lld)")

    def fcompile(output, objects, options=None):
        objs = []
        for obj in map(str, objects):
            if obj.endswith((".c", ".cc", ".cpp")):
                # only data (the serialized modules): any Hexagon CPU version links with the kernels' objects
                r = subprocess.run([clang, "--target=hexagon", "-fPIC", "-O2", "-x", "c++", "-c", obj,
                                    "-o", obj + ".o"], capture_output=True, text=True)
                if r.returncode != 0:
                    raise XpucError(f"clang for Hexagon failed: {r.stderr.strip()[-300:]}")
                obj += ".o"
            objs.append(obj)
        r = subprocess.run([lld, "-shared", "-o", str(output), *objs], capture_output=True, text=True)
        if r.returncode != 0:
            raise XpucError(f"ld.lld failed: {r.stderr.strip()[-300:]}")

    fcompile.output_format = "so"
    return fcompile


def build_hexagon(funcs: dict, arch: str, out: Path) -> Path:
    """Compile named PrimFuncs for ``qcom/hexagon-<arch>`` and link ``out`` (.so) with ld.lld."""
    import tvm

    lld = shutil.which("ld.lld")
    if lld is None:
        raise XpucError("ld.lld not found (Debian: apt-get install lld)")
    linked: list[str] = []
    _register_lld_linker(lld, linked)
    target = tvm.target.Target(f"qcom/hexagon-{arch}", host=f"qcom/hexagon-{arch}")
    mod = tvm.IRModule({n: f.with_attr("global_symbol", n).with_attr("target", target) for n, f in funcs.items()})
    _compile_tir(mod, target)
    if not linked:
        raise XpucError("the Hexagon codegen produced no shared object")
    shutil.copyfile(linked[-1], out)
    return out
