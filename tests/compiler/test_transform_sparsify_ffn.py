"""SparsifyFFN: Before/Expected structural tests per FFN kind, and a numerical oracle-mask check."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R
from tvm.script import tirx as T

from xpuc.compiler.passes.sparsify_ffn import SparsifyFFN, find_ffns
from xpuc.runtime.formats.bundle import BundleLayout, bundle_ffn
from xpuc.schedules.sparse_ffn import sparse_ffn_kernel

D, F, C = 64, 128, 16  # bundle (8, 16, R, 64) float16


@I.ir_module
class BeforeReGLU:
    @R.function
    def decode(x: R.Tensor((1, 64), "float32"), wg: R.Tensor((128, 64), "float32"),
               wu: R.Tensor((128, 64), "float32"), wd: R.Tensor((64, 128), "float32")) -> R.Tensor((1, 64), "float32"):
        with R.dataflow():
            tg = R.permute_dims(wg)
            g = R.matmul(x, tg)
            tu = R.permute_dims(wu)
            u = R.matmul(x, tu)
            a = R.nn.relu(g)
            h = R.multiply(a, u)
            td = R.permute_dims(wd)
            y = R.matmul(h, td)
            out = R.add(x, y)
            R.output(out)
        return out


@I.ir_module
class ExpectedReGLU:
    @T.prim_func(private=True)
    def sparse_ffn_reglu_float16_c16(x: T.handle, idx: T.handle, thr: T.handle, w: T.handle, y: T.handle):
        T.evaluate(0)  # replaced by the generated kernel below

    @R.function
    def decode(x: R.Tensor((1, 64), "float32"), wg: R.Tensor((128, 64), "float32"),
               wu: R.Tensor((128, 64), "float32"), wd: R.Tensor((64, 128), "float32"),
               ffn0_idx: R.Tensor(("k0",), "int32"), ffn0_thr: R.Tensor((1,), "float32"),
               ffn0_bundle: R.Tensor((8, 16, 3, 64), "float16")) -> R.Tensor((1, 64), "float32"):
        with R.dataflow():
            lv = R.reshape(x, R.shape([64]))
            lv1 = R.call_tir(ExpectedReGLU.sparse_ffn_reglu_float16_c16, (lv, ffn0_idx, ffn0_thr, ffn0_bundle),
                             out_ty=R.Tensor((64,), "float32"))
            y = R.reshape(lv1, R.shape([1, 64]))
            out = R.add(x, y)
            R.output(out)
        return out


def _with_kernel(mod: tvm.IRModule, kind: str) -> tvm.IRModule:
    gv = mod.get_global_var(f"sparse_ffn_{kind}_float16_c{C}")
    mod = tvm.IRModule(dict(mod.functions))
    mod[gv] = sparse_ffn_kernel(BundleLayout(kind, D, F, C, "float16"), "fused", 2)
    return mod


def test_reglu_structural():
    after = SparsifyFFN(D, F, C, "float16")(BeforeReGLU)
    tvm.ir.assert_structural_equal(after, _with_kernel(ExpectedReGLU, "reglu"))


@I.ir_module
class BeforeAllKinds:
    @R.function
    def decode(x: R.Tensor((1, 1, 64), "float32"), wg: R.Tensor((128, 64), "float32"),
               wu: R.Tensor((128, 64), "float32"), wd: R.Tensor((64, 128), "float32")):
        with R.dataflow():
            tg = R.permute_dims(wg)
            g = R.matmul(x, tg)
            tu = R.permute_dims(wu)
            u = R.matmul(x, tu)
            td = R.permute_dims(wd)
            s = R.nn.silu(g)
            h1 = R.multiply(s, u)
            y1 = R.matmul(h1, td)          # swiglu
            rg = R.nn.relu(g)
            ru = R.nn.relu(u)
            h2 = R.multiply(rg, ru)
            y2 = R.matmul(h2, td)          # drelu
            y3 = R.matmul(ru, td)          # relu (up only)
            t = R.add(y1, y2)
            out = R.add(t, y3)
            R.output(out)
        return out


def test_finds_every_kind():
    kinds = [m.kind for m in find_ffns(BeforeAllKinds["decode"])]
    assert kinds == ["swiglu", "drelu", "relu"]


def test_no_ffn_no_change():
    @I.ir_module
    class NoFFN:
        @R.function
        def decode(x: R.Tensor((1, 64), "float32"), w: R.Tensor((64, 64), "float32")):
            with R.dataflow():
                t = R.permute_dims(w)
                y = R.matmul(x, t)
                R.output(y)
            return y

    tvm.ir.assert_structural_equal(SparsifyFFN(D, F, C)(NoFFN), NoFFN)


@pytest.mark.parametrize("kind", ["reglu", "drelu", "relu", "swiglu"])
def test_oracle_mask_equals_dense_numerically(kind):
    """Rewritten module with the true active clusters gives the dense module's output."""
    from xpuc.schedules.sparse_ffn_host import SparseFFNKernel
    from xpuc.targets.profile import load_profile

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType([1, D], "float32"))
    wg = relax.Var("wg", relax.TensorType([F, D], "float32"))
    wu = relax.Var("wu", relax.TensorType([F, D], "float32"))
    wd = relax.Var("wd", relax.TensorType([D, F], "float32"))
    with bb.function("decode", [x, wg, wu, wd]):
        with bb.dataflow():
            u = bb.emit(relax.op.matmul(x, bb.emit(relax.op.permute_dims(wu))))
            if kind == "relu":
                h = bb.emit(relax.op.nn.relu(u))
            else:
                g = bb.emit(relax.op.matmul(x, bb.emit(relax.op.permute_dims(wg))))
                act = relax.op.nn.silu if kind == "swiglu" else relax.op.nn.relu
                a = bb.emit(act(g))
                h = bb.emit(relax.op.multiply(a, bb.emit(relax.op.nn.relu(u)) if kind == "drelu" else u))
            y = bb.emit_output(relax.op.matmul(h, bb.emit(relax.op.permute_dims(wd))))
        bb.emit_func_output(y)
    dense_mod = bb.get()
    sparse_mod = SparsifyFFN(D, F, C, "float32")(dense_mod)
    target = load_profile("host").cpu_target()
    dense_vm = relax.VirtualMachine(tvm.compile(dense_mod, target=target), tvm.cpu())
    sparse_vm = relax.VirtualMachine(tvm.compile(sparse_mod, target=target), tvm.cpu())
    rng = np.random.default_rng(0)
    for trial in range(3):
        xv = rng.standard_normal((1, D)).astype(np.float32)
        G, U, Dn = (rng.standard_normal(s).astype(np.float32) for s in [(F, D), (F, D), (D, F)])
        # silence 3 of every 4 clusters for this x (gate pre-activation pushed to -2, or up for relu)
        silent = np.repeat(rng.random(F // C) < 0.75, C)
        gate_like = U if kind == "relu" else G
        xn = xv[0] / np.dot(xv[0], xv[0])
        gate_like[silent] -= np.outer(gate_like[silent] @ xv[0] + 2.0, xn)
        layout = BundleLayout(kind, D, F, C, "float32")
        bundle = bundle_ffn(layout, U, Dn, G)
        idx = SparseFFNKernel(layout, bundle).active_clusters(xv[0])
        if kind != "swiglu":  # SiLU is never exactly zero: its oracle mask is every cluster
            assert 0 < idx.size < layout.n_clusters, idx
        args = [tvm.runtime.tensor(a) for a in (xv, G, U, Dn)]
        want = dense_vm["decode"](*args).numpy()
        got = sparse_vm["decode"](*args, tvm.runtime.tensor(idx), tvm.runtime.tensor(np.zeros(1, np.float32)),
                                  tvm.runtime.tensor(bundle)).numpy()
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max(), err_msg=f"trial {trial}")


def test_xpuc_decode_function_with_oracle_mask_equals_dense(tmp_path):
    """The pass on xpuc's own decode function (fused gate|up call_tir kernels, packed params) of a generated
    dReLU model: with each layer's true active clusters, sparse decode gives the dense decode's logits."""
    from tvm.runtime import ShapeTuple

    from xpuc.compiler.frontends import load_model
    from xpuc.compiler.reference import ReferenceModel
    from xpuc.compiler.relax_model import export_model, param_arrays
    from xpuc.compiler.synth import synthesize
    from xpuc.targets.profile import load_profile

    synthesize("tiny", 0.9, 3, tmp_path / "m")
    spec = load_model(tmp_path / "m")
    c = spec.config
    cluster = 8
    target = load_profile("host").cpu_target()
    mod, params = export_model(c, target)
    with target:
        dense = relax.VirtualMachine(tvm.compile(mod, target=target), tvm.cpu())
        sparse = relax.VirtualMachine(
            tvm.compile(SparsifyFFN(c.hidden_size, c.intermediate_size, cluster, "float16")(mod), target=target),
            tvm.cpu())
    arrays = param_arrays(spec)
    weights = [tvm.runtime.tensor(arrays[n]) for n, _, _ in params]
    layout = BundleLayout("drelu", c.hidden_size, c.intermediate_size, cluster, "float16")
    bundles, extra_thr = [], tvm.runtime.tensor(np.zeros(1, np.float32))
    for i in range(c.num_layers):
        w = {k: spec.weights[f"layers.{i}.{k}"].astype(np.float16).astype(np.float32)
             for k in ("gate_proj", "up_proj", "down_proj")}
        bundles.append(tvm.runtime.tensor(bundle_ffn(layout, w["up_proj"], w["down_proj"], w["gate_proj"])))

    def run(vm, ids, extra_fn=None):
        kv = vm["create_paged_kv_cache"](ShapeTuple([1]), ShapeTuple([128]), ShapeTuple([32]), ShapeTuple([16]),
                                         ShapeTuple([0]))
        tvm.get_global_func("vm.builtin.kv_state_add_sequence")(kv, 0)
        begin = tvm.get_global_func("vm.builtin.kv_state_begin_forward")
        end = tvm.get_global_func("vm.builtin.kv_state_end_forward")
        begin(kv, ShapeTuple([0]), ShapeTuple([len(ids) - 1]))
        _, kv = vm["prefill"](tvm.runtime.tensor(np.array([ids[:-1]], np.int32)), kv, weights)
        end(kv)
        begin(kv, ShapeTuple([0]), ShapeTuple([1]))
        extra = extra_fn() if extra_fn else []
        logits, kv = vm["decode"](tvm.runtime.tensor(np.array([[ids[-1]]], np.int32)), kv, weights, *extra)
        end(kv)
        return logits.numpy()[0, -1]

    ids = [5, 77, 300, 12, 9, 450, 31]
    ref = ReferenceModel(spec, "float16")
    h = ref.w["embed_tokens"][ids]
    pos = np.arange(len(ids))
    extra, fired = [], []
    from xpuc.compiler.synth import _ffn_input

    for i in range(c.num_layers):  # the last token's FFN input per layer -> its true active clusters
        x = _ffn_input(ref, i, h, len(ids))[-1]
        p = f"layers.{i}."
        act = (ref.w[p + "gate_proj"] @ x > 0) & (ref.w[p + "up_proj"] @ x > 0)
        idx = np.flatnonzero(act.reshape(-1, cluster).any(1)).astype(np.int32)
        fired.append(idx.size / (c.intermediate_size // cluster))
        extra += [tvm.runtime.tensor(idx), extra_thr, bundles[i]]
        h = ref.layer(i, h, pos)
    assert max(fired) < 0.9  # the oracle really leaves clusters out
    want = run(dense, ids)
    got = run(sparse, ids, lambda: extra)
    np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-3 * np.abs(want).max())
    assert int(np.argmax(got)) == int(np.argmax(want))
