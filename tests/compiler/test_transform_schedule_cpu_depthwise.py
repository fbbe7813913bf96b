"""ScheduleCPUDepthwise: Before/Expected in TVMScript, numerics against numpy, kernels it must leave alone."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm.script import ir as I
from tvm.script import tirx as T

from xpuc.compiler.passes.schedule_cpu_depthwise import ScheduleCPUDepthwise


@I.ir_module
class Before:
    @T.prim_func(private=True, s_tir=True)
    def fused_conv2d_add_relu(x: T.Buffer((T.int64(1), T.int64(4), T.int64(6), T.int64(16)), "float32"),
                              w: T.Buffer((T.int64(4), T.int64(1), T.int64(3), T.int64(3)), "float32"),
                              b: T.Buffer((T.int64(1), T.int64(4), T.int64(1), T.int64(1)), "float32"),
                              out: T.Buffer((T.int64(1), T.int64(4), T.int64(6), T.int64(16)), "float32")):
        T.func_attr({"tirx.noalias": True})
        pad_temp = T.sblock_alloc_buffer((T.int64(1), T.int64(4), T.int64(8), T.int64(18)))
        conv = T.sblock_alloc_buffer((T.int64(1), T.int64(4), T.int64(6), T.int64(16)))
        biased = T.sblock_alloc_buffer((T.int64(1), T.int64(4), T.int64(6), T.int64(16)))
        for i0, i1, i2, i3 in T.grid(T.int64(1), T.int64(4), T.int64(8), T.int64(18)):
            with T.sblock("pad_temp"):
                v0, v1, v2, v3 = T.axis.remap("SSSS", [i0, i1, i2, i3])
                T.reads(x[v0, v1, v2 - T.int64(1), v3 - T.int64(1)])
                T.writes(pad_temp[v0, v1, v2, v3])
                pad_temp[v0, v1, v2, v3] = T.if_then_else(
                    T.int64(1) <= v2 and v2 < T.int64(7) and T.int64(1) <= v3 and v3 < T.int64(17),
                    x[v0, v1, v2 - T.int64(1), v3 - T.int64(1)], T.float32(0.0))
        for nn, ff, yy, xx, rc, ry, rx in T.grid(T.int64(1), T.int64(4), T.int64(6), T.int64(16), T.int64(1),
                                                 T.int64(3), T.int64(3)):
            with T.sblock("group_conv2d_nchw"):
                v_nn, v_ff, v_yy, v_xx, v_rc, v_ry, v_rx = T.axis.remap("SSSSRRR", [nn, ff, yy, xx, rc, ry, rx])
                T.reads(pad_temp[v_nn, v_ff + v_rc, v_yy + v_ry, v_xx + v_rx], w[v_ff, v_rc, v_ry, v_rx])
                T.writes(conv[v_nn, v_ff, v_yy, v_xx])
                with T.init():
                    conv[v_nn, v_ff, v_yy, v_xx] = T.float32(0.0)
                conv[v_nn, v_ff, v_yy, v_xx] = (conv[v_nn, v_ff, v_yy, v_xx]
                                                + pad_temp[v_nn, v_ff + v_rc, v_yy + v_ry, v_xx + v_rx]
                                                * w[v_ff, v_rc, v_ry, v_rx])
        for a0, a1, a2, a3 in T.grid(T.int64(1), T.int64(4), T.int64(6), T.int64(16)):
            with T.sblock("T_add"):
                v0, v1, v2, v3 = T.axis.remap("SSSS", [a0, a1, a2, a3])
                T.reads(conv[v0, v1, v2, v3], b[v0, v1, T.int64(0), T.int64(0)])
                T.writes(biased[v0, v1, v2, v3])
                biased[v0, v1, v2, v3] = conv[v0, v1, v2, v3] + b[v0, v1, T.int64(0), T.int64(0)]
        for a0, a1, a2, a3 in T.grid(T.int64(1), T.int64(4), T.int64(6), T.int64(16)):
            with T.sblock("relu"):
                v0, v1, v2, v3 = T.axis.remap("SSSS", [a0, a1, a2, a3])
                T.reads(biased[v0, v1, v2, v3])
                T.writes(out[v0, v1, v2, v3])
                out[v0, v1, v2, v3] = T.max(biased[v0, v1, v2, v3], T.float32(0.0))


@I.ir_module
class Expected:
    @T.prim_func(private=True, s_tir=True)
    def fused_conv2d_add_relu(x: T.Buffer((T.int64(1), T.int64(4), T.int64(6), T.int64(16)), "float32"),
                              w: T.Buffer((T.int64(4), T.int64(1), T.int64(3), T.int64(3)), "float32"),
                              b: T.Buffer((T.int64(1), T.int64(4), T.int64(1), T.int64(1)), "float32"),
                              out: T.Buffer((T.int64(1), T.int64(4), T.int64(6), T.int64(16)), "float32")):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        pad_temp = T.sblock_alloc_buffer((T.int64(1), T.int64(4), T.int64(8), T.int64(18)))
        conv = T.sblock_alloc_buffer((T.int64(1), T.int64(4), T.int64(6), T.int64(16)))
        biased = T.sblock_alloc_buffer((T.int64(1), T.int64(4), T.int64(6), T.int64(16)))
        for nn_ff_fused in T.parallel(T.int64(4)):
            for ax0, ax1 in T.grid(T.int64(8), T.int64(18)):
                with T.sblock("pad_temp"):
                    v0 = T.axis.spatial(T.int64(1), T.int64(0))
                    v1, v2, v3 = T.axis.remap("SSS", [nn_ff_fused, ax0, ax1])
                    T.reads(x[v0, v1, v2 - T.int64(1), v3 - T.int64(1)])
                    T.writes(pad_temp[v0, v1, v2, v3])
                    pad_temp[v0, v1, v2, v3] = T.if_then_else(
                        T.int64(1) <= v2 and v2 < T.int64(7) and T.int64(1) <= v3 and v3 < T.int64(17),
                        x[v0, v1, v2 - T.int64(1), v3 - T.int64(1)], T.float32(0.0))
            for yy in range(T.int64(6)):
                for xx_0 in range(T.int64(2)):
                    for xx_1_init in T.vectorized(T.int64(8)):
                        with T.sblock("group_conv2d_nchw_init"):
                            v_nn = T.axis.spatial(T.int64(1), T.int64(0))
                            v_ff, v_yy = T.axis.remap("SS", [nn_ff_fused, yy])
                            v_xx = T.axis.spatial(T.int64(16), xx_0 * T.int64(8) + xx_1_init)
                            T.reads()
                            T.writes(conv[v_nn, v_ff, v_yy, v_xx])
                            conv[v_nn, v_ff, v_yy, v_xx] = T.float32(0.0)
                    for rc, ry, rx in T.grid(T.int64(1), T.int64(3), T.int64(3)):
                        for xx_1 in T.vectorized(T.int64(8)):
                            with T.sblock("group_conv2d_nchw_update"):
                                v_nn = T.axis.spatial(T.int64(1), T.int64(0))
                                v_ff, v_yy = T.axis.remap("SS", [nn_ff_fused, yy])
                                v_xx = T.axis.spatial(T.int64(16), xx_0 * T.int64(8) + xx_1)
                                v_rc, v_ry, v_rx = T.axis.remap("RRR", [rc, ry, rx])
                                T.reads(conv[v_nn, v_ff, v_yy, v_xx],
                                        pad_temp[v_nn, v_ff + v_rc, v_yy + v_ry, v_xx + v_rx],
                                        w[v_ff, v_rc, v_ry, v_rx])
                                T.writes(conv[v_nn, v_ff, v_yy, v_xx])
                                conv[v_nn, v_ff, v_yy, v_xx] = (conv[v_nn, v_ff, v_yy, v_xx]
                                                                + pad_temp[v_nn, v_ff + v_rc, v_yy + v_ry, v_xx + v_rx]
                                                                * w[v_ff, v_rc, v_ry, v_rx])
                for ax0_0 in range(T.int64(2)):
                    for ax0_1 in T.vectorized(T.int64(8)):
                        with T.sblock("T_add"):
                            v0 = T.axis.spatial(T.int64(1), T.int64(0))
                            v1, v2 = T.axis.remap("SS", [nn_ff_fused, yy])
                            v3 = T.axis.spatial(T.int64(16), ax0_0 * T.int64(8) + ax0_1)
                            T.reads(conv[v0, v1, v2, v3], b[v0, v1, T.int64(0), T.int64(0)])
                            T.writes(biased[v0, v1, v2, v3])
                            biased[v0, v1, v2, v3] = conv[v0, v1, v2, v3] + b[v0, v1, T.int64(0), T.int64(0)]
                for ax0_0 in range(T.int64(2)):
                    for ax0_1 in T.vectorized(T.int64(8)):
                        with T.sblock("relu"):
                            v0 = T.axis.spatial(T.int64(1), T.int64(0))
                            v1, v2 = T.axis.remap("SS", [nn_ff_fused, yy])
                            v3 = T.axis.spatial(T.int64(16), ax0_0 * T.int64(8) + ax0_1)
                            T.reads(biased[v0, v1, v2, v3])
                            T.writes(out[v0, v1, v2, v3])
                            out[v0, v1, v2, v3] = T.max(biased[v0, v1, v2, v3], T.float32(0.0))


@I.ir_module
class ConvThenSum:
    """A grouped convolution whose consumer is a reduction: not a row epilogue, left to ScheduleCPURows."""

    @T.prim_func(private=True, s_tir=True)
    def conv_sum(x: T.Buffer((T.int64(1), T.int64(2), T.int64(4), T.int64(8)), "float32"),
                 w: T.Buffer((T.int64(2), T.int64(1), T.int64(1), T.int64(1)), "float32"),
                 out: T.Buffer((T.int64(1), T.int64(2)), "float32")):
        T.func_attr({"tirx.noalias": True})
        conv = T.sblock_alloc_buffer((T.int64(1), T.int64(2), T.int64(4), T.int64(8)))
        for nn, ff, yy, xx, rc, ry, rx in T.grid(T.int64(1), T.int64(2), T.int64(4), T.int64(8), T.int64(1),
                                                 T.int64(1), T.int64(1)):
            with T.sblock("group_conv2d_nchw"):
                v_nn, v_ff, v_yy, v_xx, v_rc, v_ry, v_rx = T.axis.remap("SSSSRRR", [nn, ff, yy, xx, rc, ry, rx])
                T.reads(x[v_nn, v_ff + v_rc, v_yy + v_ry, v_xx + v_rx], w[v_ff, v_rc, v_ry, v_rx])
                T.writes(conv[v_nn, v_ff, v_yy, v_xx])
                with T.init():
                    conv[v_nn, v_ff, v_yy, v_xx] = T.float32(0.0)
                conv[v_nn, v_ff, v_yy, v_xx] = (conv[v_nn, v_ff, v_yy, v_xx]
                                                + x[v_nn, v_ff + v_rc, v_yy + v_ry, v_xx + v_rx]
                                                * w[v_ff, v_rc, v_ry, v_rx])
        for a0, a1, k0, k1 in T.grid(T.int64(1), T.int64(2), T.int64(4), T.int64(8)):
            with T.sblock("sum"):
                v0, v1, vk0, vk1 = T.axis.remap("SSRR", [a0, a1, k0, k1])
                T.reads(conv[v0, v1, vk0, vk1])
                T.writes(out[v0, v1])
                with T.init():
                    out[v0, v1] = T.float32(0.0)
                out[v0, v1] = out[v0, v1] + conv[v0, v1, vk0, vk1]


def test_depthwise_conv_runs_per_channel_with_the_row_vectorized_and_the_epilogue_fused():
    after = ScheduleCPUDepthwise(lanes=8)(Before)
    tvm.ir.assert_structural_equal(after, Expected)


def test_scheduled_depthwise_conv_matches_numpy():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 4, 6, 16)).astype(np.float32)
    w = rng.standard_normal((4, 1, 3, 3)).astype(np.float32)
    b = rng.standard_normal((1, 4, 1, 1)).astype(np.float32)
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    conv = sum(xp[:, :, i:i + 6, j:j + 16] * w[None, :, 0, i, j, None, None] for i in range(3) for j in range(3))
    want = np.maximum(conv + b, 0)
    target = tvm.target.Target("llvm")
    for mod in (Before, ScheduleCPUDepthwise(lanes=8)(Before)):
        f = tvm.compile(tvm.IRModule({"main": mod["fused_conv2d_add_relu"].with_attr("global_symbol", "main")}),
                        target=target)["main"]
        out = tvm.runtime.empty((1, 4, 6, 16), "float32")
        f(*[tvm.runtime.tensor(a) for a in (x, w, b)], out)
        np.testing.assert_allclose(out.numpy(), want, rtol=1e-5, atol=1e-5)


def test_a_convolution_feeding_a_reduction_is_left_to_the_row_schedule():
    after = ScheduleCPUDepthwise(lanes=8)(ConvThenSum)
    tvm.ir.assert_structural_equal(after, ConvThenSum)


def test_already_scheduled_kernels_are_left_alone():
    marked = Before.clone()
    marked["fused_conv2d_add_relu"] = Before["fused_conv2d_add_relu"].with_attr("tirx.is_scheduled", True)
    tvm.ir.assert_structural_equal(ScheduleCPUDepthwise(lanes=8)(marked), marked)


@pytest.mark.parametrize("shape,kernel,stride,pad,dilation", [
    ((1, 6, 9, 15), 3, 1, 1, 1),  # width 15: no vector width divides it, the row stays scalar
    ((1, 8, 12, 32), 5, 2, 2, 1),  # stride 2
    ((2, 4, 7, 16), 3, (2, 1), 1, 2),  # batch 2, stride (2, 1), dilation 2
])
def test_depthwise_convs_through_the_cpu_pipeline_match_numpy(shape, kernel, stride, pad, dilation):
    """A relax depthwise conv2d + bias + ReLU, legalized, fused and scheduled as the CPU pipeline does."""
    from tvm import relax

    from xpuc.compiler.passes.schedule_cpu_rows import ScheduleCPURows

    n, c, h, wd = shape
    sy, sx = (stride, stride) if isinstance(stride, int) else stride
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(shape, "float32"))
    w = relax.Var("w", relax.TensorType((c, 1, kernel, kernel), "float32"))
    b = relax.Var("b", relax.TensorType((1, c, 1, 1), "float32"))
    with bb.function("main", [x, w, b]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.conv2d(x, w, strides=(sy, sx), padding=pad, dilation=dilation, groups=c))
            out = bb.emit_output(relax.op.nn.relu(relax.op.add(y, b)))
        bb.emit_func_output(out)
    mod = tvm.transform.Sequential([relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(),
                                    relax.transform.FuseOps(), relax.transform.FuseTIR()])(bb.get())
    scheduled = ScheduleCPUDepthwise(lanes=8)(mod)
    assert any(f.attrs and "tirx.is_scheduled" in f.attrs for f in scheduled.functions.values()
               if isinstance(f, tvm.tirx.PrimFunc))
    scheduled = ScheduleCPURows(lanes=8)(scheduled)
    rng = np.random.default_rng(1)
    xa, wa, ba = (rng.standard_normal(s).astype(np.float32) for s in (shape, (c, 1, kernel, kernel), (1, c, 1, 1)))
    xp = np.pad(xa, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    ho = (h + 2 * pad - dilation * (kernel - 1) - 1) // sy + 1
    wo = (wd + 2 * pad - dilation * (kernel - 1) - 1) // sx + 1
    conv = sum(xp[:, :, i * dilation: i * dilation + sy * (ho - 1) + 1: sy,
                  j * dilation: j * dilation + sx * (wo - 1) + 1: sx] * wa[None, :, 0, i, j, None, None]
               for i in range(kernel) for j in range(kernel))
    want = np.maximum(conv + ba, 0)
    ex = tvm.compile(scheduled, target=tvm.target.Target("llvm"))
    vm = relax.VirtualMachine(ex, tvm.cpu())
    got = vm["main"](*[tvm.runtime.tensor(a) for a in (xa, wa, ba)]).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
