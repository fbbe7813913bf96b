"""LiftConstants: a graph's constant tensors become parameters of its functions, for the artifact's weights file.

``tvm.compile`` serializes every ``relax.Constant`` into the executable, so an imported graph's weights
(and what ``FoldConstant`` computed from them: packed panels, folded batch norms, fills) end up inside the
shared library. The pass replaces each constant of at least ``min_bytes`` in a Relax function by a new
parameter appended after the function's inputs, in order of first use, and records the values in the
function's ``"params"`` attribute (the convention of ``tvm.relax.frontend.detach_params``). The same
constant object used by several functions (the static bucket copies of ``main``) becomes one shared name.

Run it last, after the passes that need constants (``PackMatmulWeights``, ``FoldConstant``): the
parameters then hold exactly the arrays the kernels read.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

#: dtypes the weights file (safetensors) stores; constants of other dtypes stay in the library
LIFTABLE = frozenset(("float16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8", "bool"))


@relax.expr_functor.mutator
class _Lifter(relax.PyExprMutator):
    def __init__(self, mod: tvm.IRModule, min_bytes: int, names: dict) -> None:
        super().__init__(mod)
        self.min_bytes = min_bytes
        self.names = names  # shared across functions: constant -> parameter name
        self.vars: list[relax.Var] = []
        self.values: list = []
        self._seen: dict[str, relax.Var] = {}

    def visit_generic_const_(self, op) -> relax.Expr:
        value = op.value
        if not isinstance(value, tvm.runtime.Tensor) or str(value.dtype) not in LIFTABLE:
            return op
        nbytes = int(np.prod(value.shape)) * np.dtype(str(value.dtype)).itemsize if value.shape else 0
        if nbytes < self.min_bytes:
            return op
        key = next((k for k, (c, _) in self.names.items() if c.same_as(op)), None)
        if key is None:
            key = f"c{len(self.names)}"
            self.names[key] = (op, value)
        if key not in self._seen:
            var = relax.Var(key, op.ty)
            self._seen[key] = var
            self.vars.append(var)
            self.values.append(value)
        return self._seen[key]


@tvm.transform.module_pass(opt_level=0, name="xpuc.LiftConstants")
class LiftConstants:
    """Turn each Relax function's constants of ``min_bytes`` or more into trailing parameters.

    Parameters
    ----------
    min_bytes:
        Smaller constants (scalars, shapes, small tables) stay in the library.

    The lifted values are in each rewritten function's ``"params"`` attribute, in parameter order;
    ``tvm.relax.frontend.detach_params`` takes them out before the build.
    """

    def __init__(self, min_bytes: int = 1024) -> None:
        self.min_bytes = min_bytes

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        names: dict = {}
        out = mod.clone()
        for gv, func in mod.functions.items():
            if not isinstance(func, relax.Function):
                continue
            lifter = _Lifter(mod, self.min_bytes, names)
            body = lifter.visit_expr(func.body)
            if not lifter.vars:
                continue
            new = relax.Function(list(func.params) + lifter.vars, body, func.ret_ty, func.is_pure, func.attrs)
            out[gv] = new.with_attr("params", lifter.values)
        return out
