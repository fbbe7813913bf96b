"""LiftConstants: Before/Expected in TVMScript, shared constants across functions, and a compiled graph whose
weights live in params.safetensors (checked), not in its library."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R

from xpuc.compiler.passes.lift_constants import LiftConstants
from xpuc.runtime.errors import XpucError

W = np.arange(300, dtype=np.float32)
S = np.array([1.0, 2.0], np.float32)


@I.ir_module
class Before:
    @R.function
    def main(x: R.Tensor((2, 300), "float32"), w: R.Tensor((300,), "float32"), s: R.Tensor((2,), "float32")):
        with R.dataflow():
            y = R.add(x, w)
            z = R.multiply(y, R.reshape(s, (2, 1)))
            R.output(z)
        return z


@I.ir_module
class Expected:
    @R.function
    def main(x: R.Tensor((2, 300), "float32"), s: R.Tensor((2,), "float32"), c0: R.Tensor((300,), "float32")):
        with R.dataflow():
            y = R.add(x, c0)
            z = R.multiply(y, R.reshape(s, (2, 1)))
            R.output(z)
        return z


def test_structure_large_constants_become_trailing_parameters():
    before = relax.transform.BindParams("main", {"w": W, "s": S})(Before)
    after = LiftConstants(min_bytes=1024)(before)
    values = after["main"].attrs["params"]
    assert len(values) == 1
    np.testing.assert_array_equal(values[0].numpy(), W)
    expected = relax.transform.BindParams("main", {"s": S})(Expected)  # the 8-byte constant stays
    tvm.ir.assert_structural_equal(after["main"].without_attr("params"), expected["main"])


def test_a_constant_shared_by_two_functions_gets_one_name():
    c = relax.const(W)
    bb = relax.BlockBuilder()
    for name in ("main", "main_seq2"):
        x = relax.Var("x", relax.TensorType((2, 300), "float32"))
        with bb.function(name, [x]):
            with bb.dataflow():
                y = bb.emit_output(relax.op.add(x, c))
            bb.emit_func_output(y)
    after = LiftConstants()(bb.get())
    assert [str(p.name) for p in after["main"].params] == ["x", "c0"]
    assert [str(p.name) for p in after["main_seq2"].params] == ["x", "c0"]


def _graph(path):
    """y = x @ W + b with a 64 KiB constant weight."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = rng.standard_normal((128, 128)).astype(np.float32)
    b = rng.standard_normal(128).astype(np.float32)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 128])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 128])
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Add", ["m", "b"], ["y"])],
                          "g", [x], [y], initializer=[numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return w, b


def test_compiled_graph_keeps_its_weights_in_the_checked_parameter_file(tmp_path):
    from xpuc.compiler.build import compile_onnx
    from xpuc.runtime.graph import GraphRunner

    w, b = _graph(tmp_path / "g.onnx")
    art = compile_onnx(tmp_path / "g.onnx", tmp_path / "art", quiet=True)
    assert (art / "params.safetensors").stat().st_size >= w.nbytes
    assert w.tobytes()[:4096] not in (art / "graph.so").read_bytes()  # not in the library
    x = np.random.default_rng(1).standard_normal((4, 128)).astype(np.float32)
    np.testing.assert_allclose(GraphRunner(art)(x)[0], x @ w + b, rtol=1e-4, atol=1e-4)
    data = bytearray((art / "params.safetensors").read_bytes())
    data[-5] ^= 1
    (art / "params.safetensors").write_bytes(bytes(data))
    with pytest.raises(XpucError, match="recompile the graph"):
        GraphRunner(art)
