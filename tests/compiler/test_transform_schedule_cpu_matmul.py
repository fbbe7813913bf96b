"""ScheduleCPUMatmul: Before/Expected in TVMScript, numerics against numpy, what is left alone, speed-up."""

from __future__ import annotations

import numpy as np
import tvm
from tvm.script import ir as I
from tvm.script import tirx as T

from xpuc.compiler.passes.schedule_cpu_matmul import ScheduleCPUMatmul


@I.ir_module
class Before:
    @T.prim_func(private=True, s_tir=True)
    def fused_matmul_add(x: T.Buffer((T.int64(1), T.int64(16), T.int64(64)), "float32"),
                         w: T.Buffer((T.int64(64), T.int64(32)), "float32"),
                         r: T.Buffer((T.int64(1), T.int64(16), T.int64(32)), "float32"),
                         out: T.Buffer((T.int64(1), T.int64(16), T.int64(32)), "float32")):
        T.func_attr({"tirx.noalias": True})
        mm = T.sblock_alloc_buffer((T.int64(1), T.int64(16), T.int64(32)))
        for i0, i1, i2, k in T.grid(T.int64(1), T.int64(16), T.int64(32), T.int64(64)):
            with T.sblock("matmul"):
                v0, v1, v2, vk = T.axis.remap("SSSR", [i0, i1, i2, k])
                T.reads(x[v0, v1, vk], w[vk, v2])
                T.writes(mm[v0, v1, v2])
                with T.init():
                    mm[v0, v1, v2] = T.float32(0.0)
                mm[v0, v1, v2] = mm[v0, v1, v2] + x[v0, v1, vk] * w[vk, v2]
        for a0, a1, a2 in T.grid(T.int64(1), T.int64(16), T.int64(32)):
            with T.sblock("T_add"):
                u0, u1, u2 = T.axis.remap("SSS", [a0, a1, a2])
                T.reads(r[u0, u1, u2], mm[u0, u1, u2])
                T.writes(out[u0, u1, u2])
                out[u0, u1, u2] = r[u0, u1, u2] + mm[u0, u1, u2]


@I.ir_module
class Expected:
    @T.prim_func(private=True, s_tir=True)
    def fused_matmul_add(x: T.Buffer((T.int64(1), T.int64(16), T.int64(64)), "float32"),
                         w: T.Buffer((T.int64(64), T.int64(32)), "float32"),
                         r: T.Buffer((T.int64(1), T.int64(16), T.int64(32)), "float32"),
                         out: T.Buffer((T.int64(1), T.int64(16), T.int64(32)), "float32")):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        # with T.sblock("root"):
        mm = T.sblock_alloc_buffer((T.int64(1), T.int64(16), T.int64(32)))
        mm_local = T.sblock_alloc_buffer((T.int64(1), T.int64(16), T.int64(32)), scope="local")
        for i0 in range(T.int64(1)):
            for i1_0_i2_0_fused in T.parallel(T.int64(2)):
                for i1_1_init in T.unroll(T.int64(8)):
                    for i2_1_0_init in T.unroll(T.int64(2)):
                        for i2_1_1_init in T.vectorized(T.int64(16)):
                            with T.sblock("matmul_init"):
                                v0 = T.axis.spatial(T.int64(1), i0)
                                v1 = T.axis.spatial(T.int64(16), i1_0_i2_0_fused * T.int64(8) + i1_1_init)
                                v2 = T.axis.spatial(T.int64(32), i2_1_0_init * T.int64(16) + i2_1_1_init)
                                T.reads()
                                T.writes(mm_local[v0, v1, v2])
                                mm_local[v0, v1, v2] = T.float32(0.0)
                for k_0 in range(T.int64(16)):
                    for i1_1 in T.unroll(T.int64(8)):
                        for k_1 in T.unroll(T.int64(4)):
                            for i2_1_0 in T.unroll(T.int64(2)):
                                for i2_1_1 in T.vectorized(T.int64(16)):
                                    with T.sblock("matmul_update"):
                                        v0 = T.axis.spatial(T.int64(1), i0)
                                        v1 = T.axis.spatial(T.int64(16), i1_0_i2_0_fused * T.int64(8) + i1_1)
                                        v2 = T.axis.spatial(T.int64(32), i2_1_0 * T.int64(16) + i2_1_1)
                                        vk = T.axis.reduce(T.int64(64), k_0 * T.int64(4) + k_1)
                                        T.reads(mm_local[v0, v1, v2], x[v0, v1, vk], w[vk, v2])
                                        T.writes(mm_local[v0, v1, v2])
                                        mm_local[v0, v1, v2] = mm_local[v0, v1, v2] + x[v0, v1, vk] * w[vk, v2]
                for ax0 in range(T.int64(8)):
                    for ax1 in T.vectorized(T.int64(32)):
                        with T.sblock("mm_local"):
                            v0 = T.axis.spatial(T.int64(1), T.int64(0))
                            v1 = T.axis.spatial(T.int64(16), i1_0_i2_0_fused * T.int64(8) + ax0)
                            v2 = T.axis.spatial(T.int64(32), ax1)
                            T.reads(mm_local[v0, v1, v2])
                            T.writes(mm[v0, v1, v2])
                            mm[v0, v1, v2] = mm_local[v0, v1, v2]
                for ax0 in range(T.int64(8)):
                    for ax1 in T.vectorized(T.int64(32)):
                        with T.sblock("T_add"):
                            u0 = T.axis.spatial(T.int64(1), T.int64(0))
                            u1 = T.axis.spatial(T.int64(16), i1_0_i2_0_fused * T.int64(8) + ax0)
                            u2 = T.axis.spatial(T.int64(32), ax1)
                            T.reads(r[u0, u1, u2], mm[u0, u1, u2])
                            T.writes(out[u0, u1, u2])
                            out[u0, u1, u2] = r[u0, u1, u2] + mm[u0, u1, u2]


def test_structure():
    after = ScheduleCPUMatmul(rows=8, lanes=16, kstep=4)(Before)
    tvm.ir.assert_structural_equal(after, Expected)


def _run(mod, name, args):
    from xpuc.targets.profile import load_profile

    f = mod[name].with_attr("global_symbol", "main")
    lib = tvm.compile(tvm.IRModule({"main": f}), target=load_profile("host").cpu_target())
    arrs = [tvm.runtime.tensor(a) for a in args]
    lib["main"](*arrs)
    return arrs[-1].numpy()


def test_numerics_match_numpy():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 16, 64)).astype(np.float32)
    w = rng.standard_normal((64, 32)).astype(np.float32)
    r = rng.standard_normal((1, 16, 32)).astype(np.float32)
    out = np.zeros((1, 16, 32), np.float32)
    after = ScheduleCPUMatmul()(Before)
    want = x @ w + r
    np.testing.assert_allclose(_run(after, "fused_matmul_add", [x, w, r, out]), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(_run(Before, "fused_matmul_add", [x, w, r, out.copy()]), want, rtol=1e-5,
                               atol=1e-5)


def test_idempotent_and_leaves_non_matmuls_alone():
    once = ScheduleCPUMatmul()(Before)
    tvm.ir.assert_structural_equal(ScheduleCPUMatmul()(once), once)

    @I.ir_module
    class Elementwise:
        @T.prim_func(private=True, s_tir=True)
        def add(a: T.Buffer((T.int64(8),), "float32"), b: T.Buffer((T.int64(8),), "float32")):
            for i in range(T.int64(8)):
                with T.sblock("add"):
                    vi = T.axis.remap("S", [i])
                    b[vi] = a[vi] + T.float32(1)

    tvm.ir.assert_structural_equal(ScheduleCPUMatmul()(Elementwise), Elementwise)


def test_symbolic_rows_onnx_decoder_graph(tmp_path):
    """A whole imported decoder layer (symbolic sequence length) through the CPU pipeline equals numpy."""
    from xpuc.compiler.onnx_export import causal_mask, decoder_prefill_onnx, rope_tables
    from xpuc.runtime.formats.arch import ArchConfig

    cfg = ArchConfig("llama", 256, 64, 128, 1, 4, 2, 16, 1e4, 1e-5, "swiglu", True, False, 256)
    rng = np.random.default_rng(1)
    w = {n: (rng.standard_normal(s) * (0.1 if len(s) == 2 else 1.0) + (1.0 if n.endswith("norm") else 0.0))
         .astype(np.float32) for n, s in cfg.weight_shapes().items() if not n.startswith(("embed", "final"))}
    path = decoder_prefill_onnx(tmp_path / "d.onnx", cfg, w)
    from xpuc.compiler.build import compile_onnx
    from xpuc.runtime.graph import GraphRunner

    runner = GraphRunner(compile_onnx(path, tmp_path / "art", quiet=True, debug_dump=tmp_path / "ir"))
    dumped = sorted(p.name for p in (tmp_path / "ir" / "graph").iterdir())
    assert "09_schedule.py" in dumped
    assert "tirx.is_scheduled" in (tmp_path / "ir" / "graph" / "09_schedule.py").read_text()
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for n in (5, 19):
        x = rng.standard_normal((1, n, 64)).astype(np.float32)
        cos, sin = rope_tables(n, 16, 1e4)
        feeds = {"x": x, "cos": cos, "sin": sin, "mask": causal_mask(n)}
        want = sess.run(None, feeds)[0]
        got = runner(x, cos, sin, causal_mask(n))[0]
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3)


def _symbolic_matmul(batch: int, k: int, cols):
    """``(1, batch, seq, k) @ (1, batch, k, cols)`` with a symbolic ``seq`` (and ``cols`` when it is a Var)."""
    from tvm import te, tirx

    seq = tirx.Var("seq", "int64")
    cols = seq if cols == "seq" else tirx.const(cols, "int64")
    one, b, kk = (tirx.const(v, "int64") for v in (1, batch, k))
    a = te.placeholder((one, b, seq, kk), name="a")
    w = te.placeholder((one, b, kk, cols), name="w")
    r = te.reduce_axis((0, kk), name="k")
    mm = te.compute((one, b, seq, cols), lambda z, h, i, j: te.sum(a[z, h, i, r] * w[z, h, r, j], axis=r),
                    name="matmul")
    out = te.compute((one, b, seq, cols), lambda z, h, i, j: mm[z, h, i, j] * 0.125, name="T_multiply")
    return tvm.IRModule({"main": te.create_prim_func([a, w, out]).with_attr("global_symbol", "main")})


def test_symbolic_rows_and_columns_are_padded_and_match_numpy():
    """Attention's ``q @ k^T``: rows and columns are the sequence; the tiles run on a padded copy of ``k^T``."""
    from xpuc.targets.profile import load_profile

    after = ScheduleCPUMatmul(rows=8, lanes=16)(_symbolic_matmul(3, 32, "seq"))
    text = after["main"].script()
    # the columns are padded (the tile vectorizes); the rows keep a bounds check per row tile
    assert "a_pad" not in text and "w_pad" in text and "T.parallel(" in text and 'scope="local"' in text
    lib = tvm.compile(after, target=load_profile("host").cpu_target())
    rng = np.random.default_rng(2)
    for n in (1, 7, 8, 33):
        a = rng.standard_normal((1, 3, n, 32)).astype(np.float32)
        w = rng.standard_normal((1, 3, 32, n)).astype(np.float32)
        out = tvm.runtime.tensor(np.zeros((1, 3, n, n), np.float32))
        lib["main"](tvm.runtime.tensor(a), tvm.runtime.tensor(w), out)
        np.testing.assert_allclose(out.numpy(), (a @ w) * 0.125, rtol=1e-5, atol=1e-5)


def test_wide_weights_run_column_panels_in_parallel():
    """Enough 64-column panels per thread: the panel loop is the parallel one (weights stay in cache)."""
    from xpuc.targets.profile import load_profile

    after = ScheduleCPUMatmul(rows=8, lanes=16, threads=2)(_symbolic_matmul(1, 64, 512))
    text = after["main"].script()
    assert "T.parallel(T.int64(8))" in text  # 512 columns / 64
    lib = tvm.compile(after, target=load_profile("host").cpu_target())
    rng = np.random.default_rng(3)
    for n in (3, 16):
        a = rng.standard_normal((1, 1, n, 64)).astype(np.float32)
        w = rng.standard_normal((1, 1, 64, 512)).astype(np.float32)
        out = tvm.runtime.tensor(np.zeros((1, 1, n, 512), np.float32))
        lib["main"](tvm.runtime.tensor(a), tvm.runtime.tensor(w), out)
        np.testing.assert_allclose(out.numpy(), (a @ w) * 0.125, rtol=1e-5, atol=1e-4)


def test_tile_rows_keep_the_accumulators_in_half_the_register_file():
    from xpuc.compiler.passes.schedule_cpu_matmul import tile_rows

    assert tile_rows(24, 4, 16) == 4  # AVX-512, 4 vectors: 16 accumulators
    assert tile_rows(384, 2, 16) == 8 and tile_rows(96, 1, 16) == 8  # narrower tiles: 8 rows at most
    assert tile_rows(6, 4, 16) == 3  # a divisor of the rows, no bounds check
    assert tile_rows(5, 4, 16) == 4  # no divisor worth it: ragged rows
    assert tile_rows(None, 4, 16) == 4  # symbolic rows
    assert tile_rows(64, 4, 8) == 2 and tile_rows(64, 2, 8) == 4  # AVX2: 16 registers
