"""ConvToMatmul: Before/Expected in TVMScript, numerics against onnxruntime-free numpy references, and what
it leaves alone."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from support.host_run import run_main
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R

from xpuc.compiler.passes.conv_to_matmul import ConvToMatmul

W1 = (np.arange(3 * 2, dtype=np.float32).reshape(3, 2, 1, 1) - 2) / 10


@I.ir_module
class Before:
    @R.function
    def main(x: R.Tensor((1, 2, 4, 5), "float32"), w: R.Tensor((3, 2, 1, 1), "float32")):
        with R.dataflow():
            y = R.nn.conv2d(x, w)
            R.output(y)
        return y


@I.ir_module
class Expected:
    @R.function
    def main(x: R.Tensor((1, 2, 4, 5), "float32"), wm: R.Tensor((3, 2), "float32")):
        with R.dataflow():
            col = R.reshape(x, (1, 2, 20))
            y = R.matmul(wm, col)
            out = R.reshape(y, (1, 3, 4, 5))
            R.output(out)
        return out


def _bound(mod, name, value):
    return relax.transform.BindParams("main", {name: value})(mod)


def test_structure_of_a_pointwise_convolution():
    after = ConvToMatmul()(_bound(Before, "w", W1))
    tvm.ir.assert_structural_equal(after, _bound(Expected, "wm", W1.reshape(3, 2)))


def _conv_ref(x, w, stride, pad, dil):
    n, c, h, wd = x.shape
    o, _, kh, kw = w.shape
    xp = np.pad(x, ((0, 0), (0, 0), (pad[0], pad[2]), (pad[1], pad[3])))
    oh = (h + pad[0] + pad[2] - dil[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (wd + pad[1] + pad[3] - dil[1] * (kw - 1) - 1) // stride[1] + 1
    y = np.zeros((n, o, oh, ow), np.float64)
    for a in range(kh):
        for b in range(kw):
            win = xp[:, :, a * dil[0]:a * dil[0] + stride[0] * oh:stride[0], b * dil[1]:b * dil[1] + stride[1] * ow:
                     stride[1]]
            y += np.einsum("oc,nchw->nohw", w[:, :, a, b], win[:, :, :oh, :ow])
    return y


def _build(x_shape, w, **attrs):
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(x_shape, "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit_output(relax.op.nn.conv2d(x, relax.const(w), **attrs))
        bb.emit_func_output(y)
    return bb.get()


@pytest.mark.parametrize("stride,pad,dil", [((1, 1), (1, 1, 1, 1), (1, 1)), ((2, 2), (1, 0, 2, 1), (1, 1)),
                                            ((1, 2), (0, 0, 0, 0), (2, 1)), ((2, 2), (0, 0, 0, 0), (1, 1))])
def test_numerics_match_numpy(stride, pad, dil):
    rng = np.random.default_rng(sum(stride + pad + dil))
    x = rng.standard_normal((2, 3, 9, 11)).astype(np.float32)
    w = rng.standard_normal((5, 3, 3, 2)).astype(np.float32)
    before = _build(x.shape, w, strides=stride, padding=pad, dilation=dil)
    after = ConvToMatmul()(before)
    assert any(gv.name_hint.startswith("im2col") for gv in after.functions)
    assert "conv2d" not in after.script()
    np.testing.assert_allclose(run_main(after, x), _conv_ref(x, w, stride, pad, dil), rtol=1e-4, atol=1e-4)


def test_transposed_convolution_with_stride_equal_to_kernel():
    rng = np.random.default_rng(7)
    x = rng.standard_normal((1, 4, 3, 5)).astype(np.float32)
    w = rng.standard_normal((4, 6, 2, 2)).astype(np.float32)  # (C_in, C_out, kh, kw)
    bb = relax.BlockBuilder()
    xv = relax.Var("x", relax.TensorType(x.shape, "float32"))
    with bb.function("main", [xv]):
        with bb.dataflow():
            y = bb.emit_output(relax.op.nn.conv2d_transpose(xv, relax.const(w), strides=(2, 2)))
        bb.emit_func_output(y)
    before = bb.get()
    after = ConvToMatmul()(before)
    assert "conv2d_transpose" not in after.script()
    want = np.einsum("nchw,coab->nohawb", x, w).reshape(1, 6, 6, 10)
    np.testing.assert_allclose(run_main(after, x), want, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(run_main(before, x), want, rtol=1e-4, atol=1e-4)


def test_leaves_grouped_and_non_constant_convolutions_alone():
    rng = np.random.default_rng(3)
    grouped = _build((1, 4, 6, 6), rng.standard_normal((4, 1, 3, 3)).astype(np.float32), groups=4, padding=1)
    tvm.ir.assert_structural_equal(ConvToMatmul()(grouped), grouped)
    tvm.ir.assert_structural_equal(ConvToMatmul()(Before), Before)  # weight is a parameter, not a constant
