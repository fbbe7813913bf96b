"""PackMatmulWeights: Before/Expected in TVMScript, numerics against numpy, what it leaves alone."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from support.host_run import run_main
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R
from tvm.script import tirx as T

from xpuc.compiler.passes.pack_matmul_weights import PackMatmulWeights, pack_panels

W = np.arange(8 * 32, dtype=np.float32).reshape(8, 32) / 100


@I.ir_module
class Before:
    @R.function
    def main(x: R.Tensor((1, "n", 8), "float32"), w: R.Tensor((8, 32), "float32")) -> R.Tensor((1, "n", 32),
                                                                                                "float32"):
        with R.dataflow():
            y = R.matmul(x, w)
            R.output(y)
        return y


@I.ir_module
class Expected:
    @T.prim_func(private=True, s_tir=True)
    def matmul_packed(var_x: T.handle, B: T.Buffer((T.int64(2), T.int64(8), T.int64(16)), "float32"),
                      var_matmul: T.handle):
        T.func_attr({"op_pattern": 4, "tirx.noalias": True})
        n = T.int64()
        x = T.match_buffer(var_x, (T.int64(1), n, T.int64(8)))
        matmul = T.match_buffer(var_matmul, (T.int64(1), n, T.int64(32)))
        for i0, i1, i2, k in T.grid(T.int64(1), n, T.int64(32), T.int64(8)):
            with T.sblock("matmul"):
                v_i0, v_i1, v_i2, v_k = T.axis.remap("SSSR", [i0, i1, i2, k])
                with T.init():
                    matmul[v_i0, v_i1, v_i2] = T.float32(0.0)
                matmul[v_i0, v_i1, v_i2] = matmul[v_i0, v_i1, v_i2] + x[v_i0, v_i1, v_k] \
                    * B[v_i2 // T.int64(16), v_k, v_i2 % T.int64(16)]

    @R.function
    def main(x: R.Tensor((1, "n", 8), "float32"), wp: R.Tensor((2, 8, 16), "float32")) -> R.Tensor((1, "n", 32),
                                                                                                   "float32"):
        n = T.int64()
        cls = Expected
        with R.dataflow():
            y = R.call_tir(cls.matmul_packed, (x, wp), out_ty=R.Tensor((1, n, 32), dtype="float32"))
            R.output(y)
        return y


def _bound(mod, name, value):
    return relax.transform.BindParams("main", {name: value})(mod)


def test_pack_panels_layout():
    wp = pack_panels(W, 16)
    assert wp.shape == (2, 8, 16) and wp.flags.c_contiguous
    for j in range(32):
        np.testing.assert_array_equal(wp[j // 16, :, j % 16], W[:, j])


def test_structure():
    after = PackMatmulWeights(panel=16)(_bound(Before, "w", W))
    assert [gv.name_hint for gv in after.functions if gv.name_hint.startswith("matmul_packed")] == ["matmul_packed"]
    tvm.ir.assert_structural_equal(after, _bound(Expected, "wp", pack_panels(W, 16)))


@pytest.mark.parametrize("n", [1, 5, 16])
def test_numerics_match_numpy(n):
    x = np.random.default_rng(n).standard_normal((1, n, 8)).astype(np.float32)
    after = PackMatmulWeights(panel=16)(_bound(Before, "w", W))
    np.testing.assert_allclose(run_main(after, x), x @ W, rtol=1e-5, atol=1e-5)


def test_scheduled_decoder_graph_with_packed_weights_matches_onnxruntime(tmp_path):
    """The whole CPU pipeline (packing, then ScheduleCPUMatmul on the packed kernels) on an imported graph."""
    import onnxruntime as ort

    from xpuc.compiler.build import compile_onnx
    from xpuc.compiler.onnx_export import causal_mask, decoder_prefill_onnx, rope_tables
    from xpuc.runtime.formats.arch import ArchConfig
    from xpuc.runtime.graph import GraphRunner

    cfg = ArchConfig("llama", 256, 64, 128, 1, 4, 2, 16, 1e4, 1e-5, "swiglu", True, False, 256)
    rng = np.random.default_rng(4)
    w = {k: (rng.standard_normal(s) * 0.1).astype(np.float32) for k, s in cfg.weight_shapes().items()
         if not k.startswith(("embed", "final"))}
    path = decoder_prefill_onnx(tmp_path / "d.onnx", cfg, w)
    runner = GraphRunner(compile_onnx(path, tmp_path / "art", quiet=True, debug_dump=tmp_path / "ir"))
    dumped = (tmp_path / "ir" / "graph" / "05_pack.py").read_text()
    assert "matmul_packed" in dumped and "R.matmul(" in dumped  # attention's matmuls have no constant weight
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for n in (3, 17):
        x = rng.standard_normal((1, n, 64)).astype(np.float32)
        cos, sin = rope_tables(n, 16, 1e4)
        feeds = {"x": x, "cos": cos, "sin": sin, "mask": causal_mask(n)}
        np.testing.assert_allclose(runner(*feeds.values())[0], sess.run(None, feeds)[0], rtol=1e-4, atol=1e-4)


def test_leaves_other_matmuls_alone():
    @I.ir_module
    class TwoInputs:
        @R.function
        def main(x: R.Tensor((4, 8), "float32"), w: R.Tensor((8, 32), "float32"), v: R.Tensor((8, 24), "float32")):
            with R.dataflow():
                y = R.matmul(x, w)  # not a constant
                z = R.matmul(x, v)
                R.output(y, z)
            return (y, z)

    p = PackMatmulWeights(panel=16)
    odd = _bound(TwoInputs, "v", np.ones((8, 24), np.float32))  # 24 columns: not a multiple of the panel
    tvm.ir.assert_structural_equal(p(odd), odd)  # nothing rewritten: the module comes back as it was
