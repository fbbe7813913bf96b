"""Data-dependent ONNX ``If`` nodes run as a select between their inlined branches: against onnxruntime on both
branches, nested Ifs, branch initializers, outer-scope names; branches of different shapes refused in one line."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from xpuc.compiler.onnx_if import lower_if
from xpuc.runtime.errors import XpucError


def _out(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def _sign_graph(else_shape=(2, 3), nested=False):
    """y = x * k (k a then-branch initializer) if sum(x) > 0, else -x (or, nested: -x if x[0,0] > 0 else x + 1)."""
    then_g = helper.make_graph([helper.make_node("Mul", ["x", "k"], ["t"])], "then", [], [_out("t", [2, 3])],
                               [numpy_helper.from_array(np.array(2.0, np.float32), "k")])
    if nested:
        inner_then = helper.make_graph([helper.make_node("Neg", ["x"], ["a"])], "it", [], [_out("a", [2, 3])])
        inner_else = helper.make_graph([helper.make_node("Add", ["x", "one"], ["b"])], "ie", [], [_out("b", [2, 3])])
        else_nodes = [helper.make_node("Slice", ["x", "zero_i", "one_i"], ["row"]),
                      helper.make_node("ReduceMax", ["row"], ["m"], keepdims=0),
                      helper.make_node("Greater", ["m", "zero"], ["c2"]),
                      helper.make_node("If", ["c2"], ["e"], then_branch=inner_then, else_branch=inner_else)]
    else:
        else_nodes = [helper.make_node("Neg", ["x"], ["e"])] if else_shape == (2, 3) else [
            helper.make_node("ReduceSum", ["x"], ["e"], keepdims=1)]
    else_g = helper.make_graph(else_nodes, "else", [], [_out("e", list(else_shape))])
    nodes = [helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0), helper.make_node("Greater", ["s", "zero"], ["c"]),
             helper.make_node("If", ["c"], ["y"], then_branch=then_g, else_branch=else_g, name="sign")]
    inits = [numpy_helper.from_array(np.array(v, dt), n) for n, v, dt in
             [("zero", 0.0, np.float32), ("one", 1.0, np.float32), ("zero_i", [0], np.int64), ("one_i", [1], np.int64)]]
    g = helper.make_graph(nodes, "g", [_out("x", [2, 3])], [_out("y", [2, 3])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(m)
    return m


@pytest.mark.parametrize("nested", [False, True])
def test_a_data_dependent_if_compiles_as_a_select_and_matches_onnxruntime(tmp_path, nested):
    import onnxruntime as ort

    from xpuc.compiler.build import compile_onnx
    from xpuc.runtime.graph import GraphRunner

    path = tmp_path / "if.onnx"
    onnx.save(_sign_graph(nested=nested), str(path))
    runner = GraphRunner(compile_onnx(path, tmp_path / "art", quiet=True))
    selected = runner.manifest.source["prepared"]["if_as_select"]
    assert selected == (["sign/else/If_3", "sign"] if nested else ["sign"])
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    for x in (np.abs(rng.standard_normal((2, 3))), -np.abs(rng.standard_normal((2, 3))),
              np.array([[3.0, -9, -9], [-1, -1, -1]]), np.array([[-3.0, 1, 1], [-1, -1, -1]])):
        x = x.astype(np.float32)
        np.testing.assert_allclose(runner(x)[0], sess.run(None, {"x": x})[0], rtol=1e-6)


def test_the_rewrite_keeps_outer_names_and_prefixes_branch_names():
    m, selected = lower_if(_sign_graph())
    assert selected == ["sign"] and not any(n.op_type == "If" for n in m.graph.node)
    assert {t.name for t in m.graph.initializer} >= {"zero", "sign/then/k"}  # the branch's initializer, renamed
    mul = next(n for n in m.graph.node if n.op_type == "Mul")
    assert list(mul.input) == ["x", "sign/then/k"] and list(mul.output) == ["sign/then/t"]
    where = next(n for n in m.graph.node if n.op_type == "Where")
    assert list(where.input) == ["c", "sign/then/t", "sign/else/e"] and list(where.output) == ["y"]
    onnx.checker.check_model(m)


def test_branches_of_different_shapes_are_refused_in_one_line(tmp_path):
    with pytest.raises(XpucError, match="If node 'sign': its branches give outputs of different"):
        lower_if(_sign_graph(else_shape=(1, 1)))
    path = tmp_path / "bad.onnx"
    onnx.save(_sign_graph(else_shape=(1, 1)), str(path))
    r = subprocess.run([sys.executable, "-m", "xpuc.compiler.cli", "compile", str(path), "-o", str(tmp_path / "a")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("xpuc: error:") and "If node 'sign'" in r.stderr
    assert not (tmp_path / "a").exists()
