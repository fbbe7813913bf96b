"""ConvToMatmul: dense 2-D convolutions with constant weights as im2col + matmul, which the CPU schedules.

TVM 0.27's CPU pipeline leaves a legalized ``conv2d`` as a scalar seven-deep loop nest (≈3 GFLOP/s on
AVX-512 here, against onnxruntime's ≈100), while ``ScheduleCPUMatmul`` turns a ``matmul`` block into
register-tiled, vectorized, parallel code. The pass rewrites

``y = conv2d(x, W)``  (NCHW / OIHW, ``groups == 1``, static shapes, float32, ``W`` constant)

into

* ``col[n, (c, kh, kw), (oh, ow)] = x[n, c, oh * s + kh * d - pad_top, ow * s + kw * d - pad_left]``
  (zero outside ``x``: the padding is part of the gather, no padded copy), one injective kernel;
  a 1x1 convolution with stride 1 and no padding is just ``reshape(x, (n, C, H * W))``;
* ``y = reshape(W.reshape(O, C * KH * KW) @ col, (n, O, OH, OW))``: output rows are the channels, output
  columns the pixels, so the matmul's vectorized axis is the contiguous one of ``col`` and ``y`` and a fused
  epilogue (bias, activation) stays element-wise on the tile.

A ``conv2d_transpose`` whose stride equals its kernel (the 2x up-sampling of detection / segmentation
heads) is one matmul too: ``W (O * KH * KW, C) @ x (N, C, H * W)``, then the blocks put in place.

Grouped and depthwise convolutions (memory-bound; ``ScheduleCPURows`` gives them parallel rows), other
layouts, symbolic shapes and non-constant weights are left as they are.
"""

from __future__ import annotations

import tvm
from tvm import relax, te, tirx

INJECTIVE = 2  # relax's OpPatternKind::kInjective


def im2col(x: te.Tensor, kh: int, kw: int, stride: tuple[int, int], dilation: tuple[int, int],
           pad: tuple[int, int], out_hw: tuple[int, int]) -> te.Tensor:
    """``(N, C, H, W) -> (N, C * kh * kw, OH * OW)``, zero where a window leaves ``x``."""
    n, c, h, w = x.shape
    oh, ow = out_hw
    taps = kh * kw

    def body(b, k, p):
        ci, t = tirx.floordiv(k, taps), tirx.floormod(k, taps)
        yy = tirx.floordiv(p, ow) * stride[0] + tirx.floordiv(t, kw) * dilation[0] - pad[0]
        xx = tirx.floormod(p, ow) * stride[1] + tirx.floormod(t, kw) * dilation[1] - pad[1]
        inside = tirx.all(yy >= 0, yy < h, xx >= 0, xx < w)
        return tirx.if_then_else(inside, x[b, ci, yy, xx], tirx.const(0.0, x.dtype))

    return te.compute((n, c * taps, oh * ow), body, name="im2col")


def _ints(v) -> tuple[int, ...]:
    return tuple(int(a) for a in v)


@relax.expr_functor.mutator
class _Rewriter(relax.PyExprMutator):
    def __init__(self, mod: tvm.IRModule) -> None:
        super().__init__(mod)
        self.rewritten = 0
        self._conv = tvm.ir.Op.get("relax.nn.conv2d")
        self._deconv = tvm.ir.Op.get("relax.nn.conv2d_transpose")

    def _fits(self, call: relax.Call) -> bool:
        if not (call.op.same_as(self._conv) or call.op.same_as(self._deconv)) \
                or not isinstance(call.args[1], tvm.ir.expr.Constant):
            return False
        a = call.attrs
        if call.op.same_as(self._conv):
            layout = "OIHW"
        elif call.op.same_as(self._deconv):
            layout = "IOHW"
            kh, kw = _ints(call.args[1].ty.shape)[2:]
            if _ints(a.strides) != (kh, kw) or any(_ints(a.padding)) or any(_ints(a.output_padding)) \
                    or _ints(a.dilation) != (1, 1):
                return False  # windows that overlap or are cut: not one matmul
        else:
            return False
        if int(a.groups) != 1 or a.data_layout != "NCHW" or a.kernel_layout != layout \
                or a.out_layout not in ("NCHW", "", None):
            return False
        if a.out_dtype is not None and str(a.out_dtype) not in ("", "void", "float32"):
            return False
        x, w, y = call.args[0].ty, call.args[1].ty, call.ty
        if x.dtype != "float32" or w.dtype != "float32" or x.ndim != 4 or y.ndim != 4:
            return False
        return all(isinstance(d, tirx.IntImm) for d in (*x.shape, *y.shape))

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        if not isinstance(call, relax.Call) or not self._fits(call):
            return call
        a = call.attrs
        n, c, h, w = _ints(call.args[0].ty.shape)
        _, o, oh, ow = _ints(call.ty.shape)
        weight = call.args[1].value.numpy()
        self.rewritten += 1
        if call.op.same_as(self._deconv):
            # stride == kernel: every input pixel owns its own kh x kw block of the output
            kh, kw = weight.shape[2:]
            wmat = relax.const(weight.transpose(1, 2, 3, 0).reshape(o * kh * kw, c), "float32")
            y = self.builder_.emit(relax.op.matmul(wmat, relax.op.reshape(call.args[0], (n, c, h * w))))
            y = self.builder_.emit(relax.op.reshape(y, (n, o, kh, kw, h, w)))
            return relax.op.reshape(relax.op.permute_dims(y, [0, 1, 4, 2, 5, 3]), (n, o, oh, ow))
        _, _, kh, kw = weight.shape
        stride, dilation, pad = _ints(a.strides), _ints(a.dilation), _ints(a.padding)
        x = call.args[0]
        if (kh, kw, stride, pad[:2], (oh, ow)) == (1, 1, (1, 1), (0, 0), (h, w)):
            col = self.builder_.emit(relax.op.reshape(x, (n, c, h * w)))
        else:
            col = self.builder_.emit_te(im2col, x, kh, kw, stride, dilation, pad[:2], (oh, ow),
                                        primfunc_name_hint="im2col")
        wmat = relax.const(weight.reshape(o, c * kh * kw), "float32")
        y = self.builder_.emit(relax.op.matmul(wmat, col))
        return relax.op.reshape(y, (n, o, oh, ow))


@tvm.transform.module_pass(opt_level=0, name="xpuc.ConvToMatmul")
class ConvToMatmul:
    """Rewrite dense NCHW ``conv2d`` with a constant weight into im2col + matmul (see the module docstring).

    What it did is in the module it returns: one ``im2col*`` PrimFunc per rewritten convolution that is not
    1x1 (those become a reshape), and ``matmul`` calls with the reshaped weights as constants.
    """

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        rewriter = _Rewriter(mod)
        for gv, func in mod.functions.items():
            if isinstance(func, relax.Function):
                rewriter.builder_.update_func(gv, rewriter.visit_expr(func))
        if not rewriter.rewritten:
            return mod
        return relax.transform.DeadCodeElimination()(rewriter.builder_.get())
