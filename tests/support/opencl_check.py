"""Execute the OpenCL kernels TVM generates on a CPU OpenCL implementation (pocl) and compare them with
the same PrimFunc built for the host CPU.

For one scheduled PrimFunc: build it for an OpenCL target, take the kernel source(s) from the device
module, read each kernel's grid and block sizes from the thread-bound loops of the scheduled TIR
(symbolic sizes bound to concrete values), launch the kernels in order through pyopencl, and run the
unscheduled PrimFunc built for the host with the same inputs.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import numpy as np

from xpuc.runtime.errors import XpucError

POCL_ICD = "/etc/OpenCL/vendors/pocl.icd"
_SIG = re.compile(r"__kernel\s+void\s+(\w+)\s*\(([^)]*)\)", re.S)


@dataclass
class KernelLaunch:
    name: str
    grid: tuple[int, int, int]
    block: tuple[int, int, int]
    args: list[tuple[str, str]]  # (kind 'buf'|'int'|'long'|'float', name)


def _matching(src: str, i: int, open_c: str, close_c: str) -> int:
    """Index of the bracket closing the one at ``src[i]``."""
    depth = 0
    for j in range(i, len(src)):
        if src[j] == open_c:
            depth += 1
        elif src[j] == close_c:
            depth -= 1
            if depth == 0:
                return j
    raise XpucError("unbalanced brackets in kernel source")


def without_fp16_arithmetic(source: str) -> str:
    """Rewrite fp16 loads/stores into ``vload_half``/``vstore_half`` (core OpenCL, no ``cl_khr_fp16``).

    TVM's kernels only move fp16 data (arithmetic is fp32), so this keeps their semantics on CPU OpenCL
    implementations such as pocl that lack the extension: every store ``p[i] = v;`` to an fp16 buffer
    becomes ``vstore_half(v, i, p);`` (``convert_half`` dropped: vstore_half rounds), every load ``p[i]``
    becomes ``vload_half(i, p)``. Any other use of ``half`` is left alone and fails to build loudly.
    """
    halves = sorted(set(re.findall(r"__global\s+half\*\s+restrict\s+(\w+)", source)))
    source = re.sub(r"#ifdef cl_khr_fp16.*?#endif\n", "", source, flags=re.S)
    for name in halves:
        # stores: statement-initial "name[...] = ...;"
        out, i = [], 0
        for m in re.finditer(rf"(?m)^(\s*){re.escape(name)}\[", source):
            if m.start() < i:
                continue
            b = m.end() - 1
            e = _matching(source, b, "[", "]")
            eq = re.match(r"\s*=\s*", source[e + 1:])
            if not eq:
                continue
            rhs_start = e + 1 + eq.end()
            semi = source.index(";", rhs_start)
            rhs = source[rhs_start:semi]
            rhs = re.sub(r"^\(convert_half\((.*)\)\)$", r"(\1)", rhs.strip(), flags=re.S)
            out.append(source[i:m.start()] + f"{m.group(1)}vstore_half({rhs}, {source[b + 1:e]}, {name})")
            i = semi
        out.append(source[i:])
        source = "".join(out)
        # loads: any remaining "name[...]"
        out, i = [], 0
        while (k := source.find(f"{name}[", i)) != -1:
            if k > 0 and (source[k - 1].isalnum() or source[k - 1] == "_"):
                out.append(source[i:k + len(name)])
                i = k + len(name)
                continue
            b = k + len(name)
            e = _matching(source, b, "[", "]")
            out.append(source[i:k] + f"vload_half({source[b + 1:e]}, {name})")
            i = e + 1
        out.append(source[i:])
        source = "".join(out)
    return source


def opencl_context():
    """A pyopencl context on pocl (raises XpucError when pocl or pyopencl is missing)."""
    os.environ.setdefault("OCL_ICD_VENDORS", POCL_ICD)
    try:
        import pyopencl as cl
    except ImportError:
        raise XpucError("pyopencl is not installed (pip install pyopencl)") from None
    try:
        platforms = cl.get_platforms()
    except cl.Error as e:
        raise XpucError(f"no OpenCL platform ({e}); install Debian's pocl-opencl-icd") from None
    for p in platforms:
        if "Portable Computing Language" in p.name or "pocl" in p.name.lower():
            return cl.Context(p.get_devices())
    raise XpucError("pocl not found among the OpenCL platforms; install Debian's pocl-opencl-icd")


def _launch_extents(func, bind: dict) -> list[dict[str, int]]:
    """Per kernel (outermost thread-bound loop nests, in order): {thread tag: extent}."""
    import tvm

    analyzer = _bound_analyzer(bind)
    kernels: list[dict[str, int]] = []

    def extent(e):
        return int(analyzer.simplify(e))

    def walk(stmt, current):
        if isinstance(stmt, tvm.tirx.For) and stmt.thread_binding is not None:
            tag = stmt.thread_binding.thread_tag
            if current is None:
                current = {}
                kernels.append(current)
            current[tag] = max(current.get(tag, 1), extent(stmt.extent))
            return walk(stmt.body, current)
        for child in _children(stmt):
            walk(child, current)

    walk(func.body, None)
    return kernels


def _bound_analyzer(bind: dict):
    import tvm
    from tvm.sym.analyzer import Analyzer

    analyzer = Analyzer()
    for v, val in bind.items():
        analyzer.bind(v, tvm.tirx.const(val, str(v.ty)))
    return analyzer


def _walk(stmt, fn) -> None:
    fn(stmt)
    for child in _children(stmt):
        _walk(child, fn)


def _children(stmt):
    import tvm

    s = stmt
    if isinstance(s, tvm.tirx.SeqStmt):
        return list(s.seq)
    out = []
    for attr in ("body", "then_case", "else_case", "block", "init"):
        child = getattr(s, attr, None)
        if isinstance(child, tvm.tirx.Stmt):
            out.append(child)
    return out


def launches(func, source: str, kernel_prefix: str, bind: dict, signature: re.Pattern = _SIG) -> list[KernelLaunch]:
    """The kernels of ``source`` named after ``kernel_prefix`` with their grid/block sizes from ``func``'s
    thread-bound loops (symbolic sizes bound by ``bind``); ``signature`` matches (name, parameter list)."""
    sigs: list[tuple[str, str]] = []
    for m in signature.finditer(source):  # a kernel may be printed more than once (forward declaration)
        if re.fullmatch(rf"{re.escape(kernel_prefix)}_kernel(_\d+)?", m.group(1)) and m.group(1) not in dict(sigs):
            sigs.append((m.group(1), m.group(2)))
    ext = _launch_extents(func, bind)
    if len(sigs) != len(ext):
        raise XpucError(f"{kernel_prefix}: {len(sigs)} kernels in the source but {len(ext)} launch nests")
    out = []
    for (name, params), e in zip(sigs, ext, strict=True):
        args = []
        for p in (x.strip() for x in params.split(",") if x.strip()):
            pname = re.split(r"[\s*]+", p)[-1]
            pname = pname[:-4] if pname.endswith("_ptr") else pname
            if "__global" in p or "*" in p:
                kind = "buf"
            elif "float" in p or "half" in p:
                kind = "float"
            else:
                kind = "long" if "long" in p or "int64" in p else "int"
            args.append((kind, pname))
        grid = tuple(e.get(f"blockIdx.{a}", 1) for a in "xyz")
        block = tuple(e.get(f"threadIdx.{a}", 1) for a in "xyz")
        out.append(KernelLaunch(name, grid, block, args))
    return out


def run_on_pocl(ctx, source: str, kl: list[KernelLaunch], buffers: dict[str, np.ndarray],
                scalars: dict[str, int | float]) -> dict[str, np.ndarray]:
    """Launch kernels in order over ``buffers`` (name -> host array, updated in place on return)."""
    import pyopencl as cl

    queue = cl.CommandQueue(ctx)
    prog = cl.Program(ctx, without_fp16_arithmetic(source)).build()
    mf = cl.mem_flags
    dev = {n: cl.Buffer(ctx, mf.READ_WRITE | mf.COPY_HOST_PTR, hostbuf=a) for n, a in buffers.items()}
    for ki, k in enumerate(kl):
        kern = getattr(prog, k.name)
        args = []
        for kind, name in k.args:
            if kind == "buf":
                key = f"{name}#{ki}" if f"{name}#{ki}" in dev else name
                if key not in dev:
                    raise XpucError(f"{k.name}: no buffer for argument '{name}'")
                args.append(dev[key])
            elif kind == "int":
                args.append(np.int32(scalars[name]))
            elif kind == "long":
                args.append(np.int64(scalars[name]))
            else:
                args.append(np.float32(scalars[name]))
        kern(queue, tuple(g * b for g, b in zip(k.grid, k.block, strict=True)), k.block, *args)
    queue.finish()
    for n, a in buffers.items():
        cl.enqueue_copy(queue, a, dev[n])
    queue.finish()
    return buffers


@dataclass
class KernelCheck:
    name: str
    kernels: int
    max_rel_error: float
    launches: list[KernelLaunch]
    wrote: bool  # some buffer changed: the kernels really ran


def _buffers_of(func):
    """Parameters and global scratch buffers (by name) of a scheduled PrimFunc."""
    import tvm

    params = [p for p in func.params if isinstance(p, tvm.tirx.Buffer)]
    scratch = []

    def visit(node):
        if isinstance(node, tvm.s_tir.SBlock):
            scratch.extend(b for b in node.alloc_buffers if b.scope() == "global")

    _walk(func.body, visit)
    return params, scratch


def check_primfunc(name: str, scheduled, unscheduled, gpu_target, host_target, bind: dict, ctx,
                   rng: np.random.Generator, int_high: int = 16) -> KernelCheck:
    """Run ``scheduled`` (GPU-scheduled) on pocl and ``unscheduled`` on the host; compare every buffer."""
    import tvm

    analyzer = _bound_analyzer(bind)

    def shape(buf):
        return tuple(int(analyzer.simplify(d)) for d in buf.shape)

    # without CSE the kernels' scalar arguments are the function's own shape variables, which we bind
    with gpu_target, tvm.transform.PassContext(config={"tirx.disable_cse_tir": True}):
        lib = tvm.compile(tvm.IRModule({name: scheduled.with_attr("global_symbol", name)}), target=gpu_target)
    source = lib.mod.imports[0].inspect_source() if hasattr(lib, "mod") else lib.imports[0].inspect_source()
    kl = launches(scheduled, source, name, bind)
    params, scratch = _buffers_of(scheduled)
    # Outputs of multi-output ops (split) share one name; TVM emits one kernel per output, in order.
    counts: dict[str, int] = {}
    keys = []
    for b in params:
        dup = sum(1 for q in params if q.name == b.name) > 1
        keys.append(f"{b.name}#{counts.get(b.name, 0)}" if dup else b.name)
        counts[b.name] = counts.get(b.name, 0) + 1
    arrays: dict[str, np.ndarray] = {}
    for b, key in zip(params, keys, strict=True):
        if "int" in str(b.dtype):
            arrays[key] = rng.integers(0, int_high, shape(b)).astype(str(b.dtype))
        else:
            arrays[key] = rng.standard_normal(shape(b)).astype(str(b.dtype))
    host_inputs = {n: a.copy() for n, a in arrays.items()}
    initial = {n: a.copy() for n, a in arrays.items()}
    for b in scratch:
        arrays[b.name] = np.zeros(shape(b), str(b.dtype))
    scalars = {v.name: val for v, val in bind.items()}
    got = run_on_pocl(ctx, source, kl, arrays, scalars)
    hlib = tvm.compile(tvm.IRModule({name: unscheduled.with_attr("global_symbol", name)}), target=host_target)
    htensors = [tvm.runtime.tensor(host_inputs[key]) for key in keys]
    hlib[name](*htensors)
    worst = 0.0
    for key, t in zip(keys, htensors, strict=True):
        want, have = t.numpy().astype(np.float64), got[key].astype(np.float64)
        scale = max(1.0, float(np.abs(want).max())) if want.size else 1.0
        worst = max(worst, float(np.abs(want - have).max()) / scale if want.size else 0.0)
    wrote = any(not np.array_equal(initial[k], got[k]) for k in keys)
    return KernelCheck(name, len(kl), worst, kl, wrote)


def prefill_kernels(config, target):
    """``(scheduled, reference, shape_vars)``: the prefill graph of a model shaped by ``config`` lowered for the GPU
    ``target``, the same graph only legalized (the host reference of each kernel), and each kernel's shape
    variables."""
    import tvm
    from tvm import relax

    from xpuc.compiler.pipeline import lower
    from xpuc.compiler.relax_model import export_model

    mod, _ = export_model(config, target, kernels="generic", functions=("prefill",))
    reference = relax.transform.AnnotateTIROpPattern()(relax.transform.LegalizeOps()(mod))
    scheduled = lower(mod, target)
    shape_vars = {gv.name_hint: {d for b in f.params if isinstance(b, tvm.tirx.Buffer) for d in b.shape
                                 if isinstance(d, tvm.tirx.Var)}
                  for gv, f in scheduled.functions.items() if isinstance(f, tvm.tirx.PrimFunc)}
    return scheduled, reference, shape_vars
