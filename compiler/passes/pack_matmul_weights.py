"""PackMatmulWeights: store constant matmul weights panel by panel, the layout the CPU matmul schedule reads.

``x @ W`` with a constant ``W`` of shape (K, N) reads, for each group of ``panel`` output columns, ``panel``
consecutive floats from each of the K rows, N floats apart: a strided walk through the whole weight matrix
per tile, which the hardware prefetchers follow poorly when few rows share it (short prompts). The pass
replaces ``W`` by its panel-major copy ``Wp[N / panel, K, panel]`` (computed once, at compile time) and the
matmul by a kernel that reads ``Wp[j // panel, k, j % panel]``. Once ``ScheduleCPUMatmul`` splits the columns
by ``panel`` (its tile width, ``4 * lanes``), each tile streams one contiguous ``K x panel`` block.

Applies to ``relax.matmul`` calls whose right operand is a 2-D float32 constant with N a multiple of
``panel`` and whose left operand is float32. The kernel's block is named ``matmul`` and the function is
marked output-element-wise fusable (``op_pattern`` 4), like a legalized matmul, so fusion with its
epilogues and the CPU schedule treat it the same way.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax, te, tirx

OUT_EWISE_FUSABLE = 4  # relax's OpPatternKind::kOutEWiseFusable


def packed_matmul(x: te.Tensor, wp: te.Tensor) -> te.Tensor:
    """``x (..., K) @ W (K, N)`` with ``W`` given panel-major as ``wp (N / P, K, P)``."""
    k_dim = x.shape[-1]
    panels, _, p = wp.shape
    k = te.reduce_axis((0, k_dim), name="k")

    def body(*idx):
        j = idx[-1]
        return te.sum(x[(*idx[:-1], k)] * wp[tirx.floordiv(j, p), k, tirx.floormod(j, p)], axis=k)

    return te.compute((*x.shape[:-1], panels * p), body, name="matmul")


def pack_panels(w: np.ndarray, panel: int) -> np.ndarray:
    """(K, N) -> (N / panel, K, panel), contiguous."""
    k, n = w.shape
    return np.ascontiguousarray(w.reshape(k, n // panel, panel).transpose(1, 0, 2))


@relax.expr_functor.mutator
class _Packer(relax.PyExprMutator):
    def __init__(self, mod: tvm.IRModule, panel: int) -> None:
        super().__init__(mod)
        self.panel = panel
        self.packed = 0
        self._matmul = tvm.ir.Op.get("relax.matmul")

    def _fits(self, call: relax.Call) -> bool:
        if not call.op.same_as(self._matmul) or len(call.args) != 2:
            return False
        if not isinstance(call.args[1], tvm.ir.expr.Constant):
            return False
        w = call.args[1].ty
        x = call.args[0].ty
        if w.ndim != 2 or w.dtype != "float32" or x.dtype != "float32" or x.ndim < 2:
            return False
        out_dtype = str(call.attrs.out_dtype) if call.attrs is not None and call.attrs.out_dtype is not None else ""
        if out_dtype not in ("", "void", "float32"):  # unset, or float32
            return False
        n = w.shape[1]
        return isinstance(n, tirx.IntImm) and int(n) % self.panel == 0

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        if not isinstance(call, relax.Call) or not self._fits(call):
            return call
        wp = relax.const(pack_panels(call.args[1].value.numpy(), self.panel), "float32")
        self.packed += 1
        return self.builder_.call_te(packed_matmul, call.args[0], wp, primfunc_name_hint="matmul_packed",
                                     primfunc_attrs={"op_pattern": OUT_EWISE_FUSABLE})


@tvm.transform.module_pass(opt_level=0, name="xpuc.PackMatmulWeights")
class PackMatmulWeights:
    """Rewrite ``x @ W`` with a constant ``W`` into a panel-major packed kernel (see the module docstring).

    Parameters
    ----------
    panel:
        Columns per panel: the CPU matmul schedule's tile width (``4 * lanes``: 64 with AVX-512, 16 NEON).

    What it did is in the module it returns: one ``matmul_packed*`` PrimFunc per rewritten matmul.
    """

    def __init__(self, panel: int = 64) -> None:
        self.panel = panel

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        packer = _Packer(mod, self.panel)
        for gv, func in mod.functions.items():
            if isinstance(func, relax.Function):
                packer.builder_.update_func(gv, packer.visit_expr(func))
        if not packer.packed:
            return mod
        return relax.transform.DeadCodeElimination()(packer.builder_.get())
