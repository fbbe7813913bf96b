"""SparsifyFFN: rewrite dense FFN subgraphs of a Relax function into sparse neuron-cluster kernel calls."""

from __future__ import annotations

from dataclasses import dataclass

import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator

from xpuc.runtime.formats.bundle import BundleLayout
from xpuc.schedules.sparse_ffn import sparse_ffn_kernel


@dataclass
class FFNMatch:
    """One FFN found in a function: ``down(act(gate x) [* up x])``."""

    out: relax.Var
    x: relax.Expr
    gate: relax.Var | None
    up: relax.Var
    down: relax.Var
    kind: str


def _op(expr, name: str) -> bool:
    return isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op) and expr.op.name == name


class _Bindings:
    def __init__(self, func: relax.Function) -> None:
        self.value: dict[relax.Var, relax.Expr] = {}
        for block in func.body.blocks:
            for b in block.bindings:
                if isinstance(b, relax.VarBinding):
                    self.value[b.var] = b.value

    def get(self, e):
        return self.value.get(e) if isinstance(e, relax.Var) else None

    def linear(self, e):
        """``matmul(x, permute_dims(W))`` or xpuc's ``call_tir(linear_*, (x, W))`` -> (x, W)."""
        call = self.get(e)
        if _op(call, "relax.call_tir"):
            callee, args = call.args[0], call.args[1]
            if (isinstance(callee, tvm.ir.GlobalVar) and callee.name_hint.startswith("linear_")
                    and not callee.name_hint.endswith("_bias") and len(args.fields) == 2):
                return args.fields[0], args.fields[1]
            return None
        if not _op(call, "relax.matmul"):
            return None
        t = self.get(call.args[1])
        if not _op(t, "relax.permute_dims"):
            return None
        w = t.args[0]
        return (call.args[0], w) if isinstance(w, relax.Var) else None

    def split_half(self, e, index: int):
        """``split(linear(x, W), 2, axis=-1)[index]`` (xpuc's fused gate|up projection) -> (x, W)."""
        item = self.get(e)
        if not isinstance(item, relax.TupleGetItem) or item.index != index:
            return None
        sp = self.get(item.tuple_value)
        if not _op(sp, "relax.split"):
            return None
        return self.linear(sp.args[0])

    def act(self, e, name: str):
        call = self.get(e)
        return call.args[0] if _op(call, name) else None


def find_ffns(func: relax.Function) -> list[FFNMatch]:
    """Every ``down`` projection whose input is a recognised FFN activation, in program order."""
    b = _Bindings(func)
    found = []
    for out in b.value:
        lin = b.linear(out)
        if lin is None:
            continue
        h, down = lin
        hv = b.get(h)
        match = None
        if _op(hv, "relax.multiply"):
            lhs, rhs = hv.args
            for act_name, kind in (("relax.nn.silu", "swiglu"), ("relax.nn.relu", "reglu")):
                g = b.act(lhs, act_name)
                gl = (b.linear(g) or b.split_half(g, 0)) if g is not None else None
                ul = b.linear(rhs) or b.split_half(rhs, 1)
                if gl and ul and gl[0].same_as(ul[0]):
                    match = FFNMatch(out, gl[0], gl[1], ul[1], down, kind)
                    break
                u = b.act(rhs, "relax.nn.relu")
                ul = (b.linear(u) or b.split_half(u, 1)) if u is not None else None
                if act_name == "relax.nn.relu" and gl and ul and gl[0].same_as(ul[0]):
                    match = FFNMatch(out, gl[0], gl[1], ul[1], down, "drelu")
                    break
        else:
            u = b.act(h, "relax.nn.relu")
            ul = b.linear(u) if u is not None else None
            if ul:
                match = FFNMatch(out, ul[0], None, ul[1], down, "relu")
        if match:
            found.append(match)
    return found


@mutator
class _Rewriter(PyExprMutator):
    """Re-emits a function, replacing the bindings of matched FFN outputs."""

    def __init__(self, mod: tvm.IRModule) -> None:
        super().__init__(mod)
        self.replacements: dict = {}  # FFN output var -> function(mutator) -> new value

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        make = self.replacements.get(binding.var)
        if make is None:
            return super().visit_var_binding_(binding)
        self.set_var_remap(binding.var, self.builder_.emit(make(self), name_hint=binding.var.name))


@tvm.transform.module_pass(opt_level=0, name="xpuc.SparsifyFFN")
class SparsifyFFN:
    """Replace each dense FFN of ``func_name`` by a call of the fused sparse neuron-cluster kernel.

    Parameters
    ----------
    d_model, d_ff, cluster, dtype:
        Shape and bundle format of the sparse kernels (see :class:`BundleLayout`).
    func_name:
        The Relax function to rewrite (the decode function).
    threads:
        Parallel tasks of the generated kernels.

    Notes
    -----
    Recognised patterns (``x`` a ``(1, d)`` or ``(1, 1, d)`` tensor): ``down(silu(gate x) * up x)``
    (swiglu), ``down(relu(gate x) * up x)`` (reglu),
    ``down(relu(gate x) * relu(up x))`` (drelu) and ``down(relu(up x))`` (relu), where each projection is
    ``matmul(x, permute_dims(W))`` or xpuc's own ``call_tir(linear_*, (x, W))``, and gate/up may be the
    two halves of one fused projection (``split(linear(x, W_gate_up), 2, axis=-1)``). For the ``i``-th FFN three
    parameters are appended to the function: ``ffn{i}_idx: (k_i,) int32`` (active clusters),
    ``ffn{i}_thr: (1,) float32`` (activation threshold) and ``ffn{i}_bundle`` (the bundled weights).
    The dense weight parameters stay in the signature (unused) so existing callers keep their
    argument order; the computation of the dense FFN is removed.
    """

    def __init__(self, d_model: int, d_ff: int, cluster: int, dtype: str = "float16",
                 func_name: str = "decode", threads: int = 2) -> None:
        self.d_model, self.d_ff, self.cluster, self.dtype = d_model, d_ff, cluster, dtype
        self.func_name, self.threads = func_name, threads

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        gv_func = next((gv for gv in mod.get_global_vars() if gv.name_hint == self.func_name), None)
        if gv_func is None:
            return mod
        func = mod[gv_func]
        matches = find_ffns(func)
        if not matches:
            return mod
        mod = tvm.IRModule(dict(mod.functions), attrs=mod.attrs)
        d = self.d_model
        rewriter = _Rewriter(mod)
        new_params = []
        for i, m in enumerate(matches):
            layout = BundleLayout(m.kind, d, self.d_ff, self.cluster, self.dtype)
            name = f"sparse_ffn_{m.kind}_{self.dtype}_c{self.cluster}"
            existing = rewriter.builder_.get()
            kernel_gv = next((gv for gv in existing.get_global_vars() if gv.name_hint == name), None)
            if kernel_gv is None:
                kernel_gv = rewriter.builder_.add_func(sparse_ffn_kernel(layout, "fused", self.threads), name)
            idx = relax.Var(f"ffn{i}_idx", relax.TensorType([tvm.tirx.Var(f"k{i}", "int64")], "int32"))
            thr = relax.Var(f"ffn{i}_thr", relax.TensorType([1], "float32"))
            bundle = relax.Var(f"ffn{i}_bundle",
                               relax.TensorType(list(layout.shape()), layout.storage_dtype))
            new_params += [idx, thr, bundle]

            def make(mutator, m=m, gv=kernel_gv, idx=idx, thr=thr, bundle=bundle):
                x = mutator.builder_.emit(relax.op.reshape(mutator.visit_expr(m.x), [d]))
                y = mutator.builder_.emit(
                    relax.call_tir(gv, [x, idx, thr, bundle], relax.TensorType([d], "float32")))
                return relax.op.reshape(y, m.out.ty.shape)

            rewriter.replacements[m.out] = make
        new_func = rewriter.visit_expr(func)
        new_func = relax.Function(list(new_func.params) + new_params, new_func.body, new_func.ret_ty,
                                  new_func.is_pure, new_func.attrs)
        mod = rewriter.builder_.get()
        mod[gv_func] = relax.analysis.remove_all_unused(new_func)
        return mod
