"""ScheduleCPURows: Before/Expected in TVMScript, numerics against numpy, kernels it must not reorder."""

from __future__ import annotations

import numpy as np
import tvm
from tvm.script import ir as I
from tvm.script import tirx as T

from xpuc.compiler.passes.schedule_cpu_rows import ScheduleCPURows


@I.ir_module
class Before:
    @T.prim_func(private=True, s_tir=True)
    def rms_norm(x: T.Buffer((T.int64(1), T.int64(4), T.int64(32)), "float32"),
                 out: T.Buffer((T.int64(1), T.int64(4), T.int64(32)), "float32")):
        T.func_attr({"tirx.noalias": True})
        sq = T.sblock_alloc_buffer((T.int64(1), T.int64(4)))
        for i0, i1, k in T.grid(T.int64(1), T.int64(4), T.int64(32)):
            with T.sblock("sumsq"):
                v0, v1, vk = T.axis.remap("SSR", [i0, i1, k])
                T.reads(x[v0, v1, vk])
                T.writes(sq[v0, v1])
                with T.init():
                    sq[v0, v1] = T.float32(0.0)
                sq[v0, v1] = sq[v0, v1] + x[v0, v1, vk] * x[v0, v1, vk]
        for i0, i1, i2 in T.grid(T.int64(1), T.int64(4), T.int64(32)):
            with T.sblock("norm"):
                v0, v1, v2 = T.axis.remap("SSS", [i0, i1, i2])
                T.reads(x[v0, v1, v2], sq[v0, v1])
                T.writes(out[v0, v1, v2])
                out[v0, v1, v2] = x[v0, v1, v2] / T.sqrt(sq[v0, v1] * T.float32(0.03125) + T.float32(1e-5))


@I.ir_module
class Expected:
    @T.prim_func(private=True, s_tir=True)
    def rms_norm(x: T.Buffer((T.int64(1), T.int64(4), T.int64(32)), "float32"),
                 out: T.Buffer((T.int64(1), T.int64(4), T.int64(32)), "float32")):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        # with T.sblock("root"):
        sq = T.sblock_alloc_buffer((T.int64(1), T.int64(4)))
        for i0 in range(T.int64(1)):
            for i1 in T.parallel(T.int64(4)):
                for ax0 in range(T.int64(32)):
                    with T.sblock("sumsq"):
                        v0 = T.axis.spatial(T.int64(1), T.int64(0))
                        v1, vk = T.axis.remap("SR", [i1, ax0])
                        T.reads(x[v0, v1, vk])
                        T.writes(sq[v0, v1])
                        with T.init():
                            sq[v0, v1] = T.float32(0.0)
                        sq[v0, v1] = sq[v0, v1] + x[v0, v1, vk] * x[v0, v1, vk]
                for i2_0 in range(T.int64(2)):
                    for i2_1 in T.vectorized(T.int64(16)):
                        with T.sblock("norm"):
                            v0, v1 = T.axis.remap("SS", [i0, i1])
                            v2 = T.axis.spatial(T.int64(32), i2_0 * T.int64(16) + i2_1)
                            T.reads(x[v0, v1, v2], sq[v0, v1])
                            T.writes(out[v0, v1, v2])
                            out[v0, v1, v2] = x[v0, v1, v2] / T.sqrt(sq[v0, v1] * T.float32(0.03125)
                                                                     + T.float32(1.0000000000000001e-05))


def test_structure():
    after = ScheduleCPURows(lanes=16)(Before)
    tvm.ir.assert_structural_equal(after, Expected)


def _build(mod):
    from xpuc.targets.profile import load_profile

    return tvm.compile(mod, target=load_profile("host").cpu_target())


def test_numerics_match_numpy():
    x = np.random.default_rng(0).standard_normal((1, 4, 32)).astype(np.float32)
    want = x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-5)
    for mod in (Before, ScheduleCPURows(lanes=16)(Before)):
        lib = _build(tvm.IRModule({"main": mod["rms_norm"].with_attr("global_symbol", "main")}))
        out = tvm.runtime.tensor(np.zeros_like(x))
        lib["main"](tvm.runtime.tensor(x), out)
        np.testing.assert_allclose(out.numpy(), want, rtol=1e-5, atol=1e-6)


def _legalized(build_graph) -> tvm.IRModule:
    """A Relax graph from ``build_graph(bb, x)`` with a symbolic sequence length, legalized and fused."""
    from tvm import relax, tirx
    from tvm.script import relax as R

    seq = tirx.Var("seq", "int64")
    bb = relax.BlockBuilder()
    x = relax.Var("x", R.Tensor((1, 3, seq, 64), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            out = bb.emit_output(build_graph(bb, x))
        bb.emit_func_output(out)
    seq_ = tvm.transform.Sequential([relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(),
                                     relax.transform.FuseOps(), relax.transform.FuseTIR()])
    return seq_(bb.get())


def _run_graph(mod, x):
    from tvm import relax

    from xpuc.targets.profile import load_profile

    target = load_profile("host").cpu_target()
    with target:
        ex = tvm.compile(mod, target=target, relax_pipeline=relax.pipeline.default_build_pipeline())
    return relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()


def test_softmax_rows_symbolic_length():
    from tvm import relax

    mod = _legalized(lambda bb, x: bb.emit(relax.op.nn.softmax(x, axis=-1)))
    after = ScheduleCPURows(lanes=16)(mod)
    kernels = [f for f in after.functions.values() if isinstance(f, tvm.tirx.PrimFunc)]
    assert kernels and all("T.parallel(" in f.script() for f in kernels)
    for n in (1, 5, 64):
        x = np.random.default_rng(n).standard_normal((1, 3, n, 64)).astype(np.float32)
        want = np.exp(x - x.max(-1, keepdims=True))
        want /= want.sum(-1, keepdims=True)
        np.testing.assert_allclose(_run_graph(after, x), want, rtol=1e-5, atol=1e-6)


def test_concatenate_keeps_every_block_at_its_own_loop():
    """Legalized concatenate under-declares what it reads: its producers must not move under its row loop."""
    from tvm import relax

    def graph(bb, x):
        t = bb.emit(relax.op.permute_dims(x, [0, 2, 1, 3]))
        return bb.emit(relax.op.concat([t, t * relax.const(2.0, "float32")], axis=2))

    mod = _legalized(graph)
    after = ScheduleCPURows(lanes=16)(mod)
    fused = [f for f in after.functions.values() if isinstance(f, tvm.tirx.PrimFunc) and "if_then_else" in f.script()]
    assert fused and all(f.script().count("T.parallel(") >= 2 for f in fused)
    x = np.random.default_rng(7).standard_normal((1, 3, 9, 64)).astype(np.float32)
    t = x.transpose(0, 2, 1, 3)
    np.testing.assert_allclose(_run_graph(after, x), np.concatenate([t, 2 * t], axis=2), rtol=1e-6)


def test_idempotent_and_leaves_matmuls_alone():
    once = ScheduleCPURows(lanes=16)(Before)
    tvm.ir.assert_structural_equal(ScheduleCPURows(lanes=16)(once), once)

    @I.ir_module
    class Matmul:
        @T.prim_func(private=True, s_tir=True)
        def mm(a: T.Buffer((T.int64(4), T.int64(4)), "float32"), b: T.Buffer((T.int64(4), T.int64(4)), "float32"),
               c: T.Buffer((T.int64(4), T.int64(4)), "float32")):
            for i, j, k in T.grid(T.int64(4), T.int64(4), T.int64(4)):
                with T.sblock("matmul"):
                    vi, vj, vk = T.axis.remap("SSR", [i, j, k])
                    with T.init():
                        c[vi, vj] = T.float32(0)
                    c[vi, vj] = c[vi, vj] + a[vi, vk] * b[vk, vj]

    tvm.ir.assert_structural_equal(ScheduleCPURows(lanes=16)(Matmul), Matmul)
