"""Graphs as exporters ship them: computed shapes, anonymous dims, constant-condition ``If`` and foreign
domains, through ``prepare_graph`` and ``xpuc compile`` against onnxruntime."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from xpuc.compiler.onnx_prepare import fix_input_shapes, input_dims, parse_input_shapes, prepare_graph
from xpuc.runtime.errors import XpucError


def _computed_reshape(dims=("", 4, 6)):
    """y = Reshape(x, [Shape(x)[0], -1]) * 2: the new shape is computed in the graph, as exporters write it."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [d if d != "" else None for d in dims])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, None])
    inits = [numpy_helper.from_array(np.array([0], np.int64), "zero"),
             numpy_helper.from_array(np.array([-1], np.int64), "minus1"),
             numpy_helper.from_array(np.array(2.0, np.float32), "two")]
    nodes = [helper.make_node("Shape", ["x"], ["s"]), helper.make_node("Gather", ["s", "zero"], ["n"], axis=0),
             helper.make_node("Concat", ["n", "minus1"], ["shape"], axis=0),
             helper.make_node("Reshape", ["x", "shape"], ["r"]), helper.make_node("Mul", ["r", "two"], ["y"])]
    g = helper.make_graph(nodes, "g", [x], [y], initializer=inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def _save(model, path):
    import onnx

    onnx.save(model, str(path))
    return path


def _xpuc(*args):
    return subprocess.run([sys.executable, "-m", "xpuc.compiler.cli", *map(str, args)], capture_output=True, text=True)


def test_parse_input_shapes():
    assert parse_input_shapes(["x=1,3,48,320", "mask=1x12", "s="]) == {"x": (1, 3, 48, 320), "mask": (1, 12),
                                                                        "s": ()}
    for bad in ("x", "=1,2", "x=1,a", "x=0,3", "x=-1"):
        with pytest.raises(XpucError, match="--input-shape"):
            parse_input_shapes([bad])
    with pytest.raises(XpucError, match="given twice"):
        parse_input_shapes(["x=1", "x=2"])


def test_fix_input_shapes_names_anonymous_dims_and_checks_overrides():
    m = fix_input_shapes(_computed_reshape(), {})
    assert input_dims(m.graph.input[0]) == ["x_d0", 4, 6]
    m = fix_input_shapes(_computed_reshape(), {"x": (3, 4, 6)})
    assert input_dims(m.graph.input[0]) == [3, 4, 6]
    with pytest.raises(XpucError, match="does not take.*its inputs: x"):
        fix_input_shapes(_computed_reshape(), {"img": (1, 4, 6)})
    with pytest.raises(XpucError, match="3 dims \\[\\?, 4, 6\\]; --input-shape gives 2"):
        fix_input_shapes(_computed_reshape(), {"x": (3, 4)})
    with pytest.raises(XpucError, match="dim 1 is fixed at 4"):
        fix_input_shapes(_computed_reshape(), {"x": (3, 5, 6)})


def test_prepare_folds_a_computed_shape_and_records_it():
    prepared, record = prepare_graph(_computed_reshape(), {"x": (3, 4, 6)})
    ops = [n.op_type for n in prepared.graph.node]
    assert "Shape" not in ops and "Reshape" in ops
    assert record["input_shapes"] == {"x": [3, 4, 6]} and record["nodes_in"] == 5
    assert record["nodes_out"] == len(ops) and record["simplified_by"].startswith("onnxslim ")
    _, plain = prepare_graph(_computed_reshape(), {"x": (3, 4, 6)}, simplify=False)
    assert "simplified_by" not in plain and plain["nodes_out"] == 5


def test_computed_shape_graph_compiles_with_input_shape_and_matches_onnxruntime(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    path = _save(_computed_reshape(), tmp_path / "g.onnx")
    r = _xpuc("compile", path, "--no-simplify", "-o", tmp_path / "bad")  # the converter needs a constant shape
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "cannot import" in r.stderr and "symbolic dims (x_d0) with --input-shape" in r.stderr, r.stderr
    assert not (tmp_path / "bad").exists()
    r = _xpuc("compile", path, "--input-shape", "x=3,4,6", "-o", tmp_path / "art")
    assert r.returncode == 0, r.stderr
    x = np.random.default_rng(0).standard_normal((3, 4, 6)).astype(np.float32)
    np.savez(tmp_path / "in.npz", x=x)
    r = _xpuc("run", tmp_path / "art", "--inputs", tmp_path / "in.npz", "--output", tmp_path / "out.npz")
    assert r.returncode == 0, r.stderr
    want = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    got = np.load(tmp_path / "out.npz")["y"]
    assert got.shape == (3, 24)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    from xpuc.runtime.artifact import read_manifest

    prepared = read_manifest(tmp_path / "art").source["prepared"]
    assert prepared["input_shapes"] == {"x": [3, 4, 6]} and prepared["nodes_out"] < prepared["nodes_in"]


def test_computed_shape_over_a_symbolic_dim_folds_and_keeps_the_dim(tmp_path):
    from xpuc.compiler.build import compile_onnx
    from xpuc.runtime.graph import GraphRunner

    runner = GraphRunner(compile_onnx(_save(_computed_reshape(), tmp_path / "g.onnx"), tmp_path / "a", quiet=True))
    assert runner.manifest.io["inputs"][0]["shape"] == ["x_d0", 4, 6]
    for n in (1, 5):
        x = np.random.default_rng(n).standard_normal((n, 4, 6)).astype(np.float32)
        np.testing.assert_allclose(runner(x)[0], 2 * x.reshape(n, 24), rtol=1e-6)


def _if_on_rank(rows):
    """y = Relu(x) if rank(x) == 2 else Neg(x): a condition computed from the input's shape."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [rows, 4])
    out = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [rows, 4]) for n in ("y", "t", "e")]
    then_g = helper.make_graph([helper.make_node("Relu", ["x"], ["t"])], "then", [], [out[1]])
    else_g = helper.make_graph([helper.make_node("Neg", ["x"], ["e"])], "else", [], [out[2]])
    nodes = [helper.make_node("Shape", ["x"], ["s"]), helper.make_node("Size", ["s"], ["r"]),
             helper.make_node("Equal", ["r", "two"], ["c"]),
             helper.make_node("If", ["c"], ["y"], then_branch=then_g, else_branch=else_g)]
    g = helper.make_graph(nodes, "g", [x], [out[0]], initializer=[numpy_helper.from_array(np.array(2, np.int64),
                                                                                          "two")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_if_with_a_condition_known_at_compile_time_is_folded(tmp_path):
    from xpuc.compiler.build import compile_onnx
    from xpuc.runtime.graph import GraphRunner

    runner = GraphRunner(compile_onnx(_save(_if_on_rank("n"), tmp_path / "dyn.onnx"), tmp_path / "b", quiet=True,
                                      input_shapes={"x": (3, 4)}))
    assert "if_as_select" not in runner.manifest.source["prepared"]  # folded, not selected
    x = np.random.default_rng(1).standard_normal((3, 4)).astype(np.float32)
    np.testing.assert_array_equal(runner(x)[0], np.maximum(x, 0))
    # the same If over a symbolic dim: not folded, run as a select between branches of one (named) shape
    runner = GraphRunner(compile_onnx(_save(_if_on_rank("n"), tmp_path / "dyn.onnx"), tmp_path / "a", quiet=True))
    assert runner.manifest.source["prepared"]["if_as_select"] == ["If_3"]
    x = np.random.default_rng(2).standard_normal((5, 4)).astype(np.float32)
    np.testing.assert_array_equal(runner(x)[0], np.maximum(x, 0))


def test_operators_of_other_domains_are_named_with_their_domain(tmp_path):
    from xpuc.compiler.build import compile_onnx

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])
    nodes = [helper.make_node("Normalizer", ["x"], ["a"], domain="ai.onnx.ml", norm="L2"),
             helper.make_node("Relu", ["a"], ["y"])]
    m = helper.make_model(helper.make_graph(nodes, "g", [x], [y]),
                          opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.onnx.ml", 3)])
    with pytest.raises(XpucError, match="unsupported ONNX operators: ai.onnx.ml.Normalizer$"):
        compile_onnx(_save(m, tmp_path / "ml.onnx"), tmp_path / "a", quiet=True)
    assert not (tmp_path / "a").exists()


def test_operators_outside_the_verified_set_compile_with_a_warning_in_the_manifest(tmp_path):
    """LayerNormalization converts, but some of its node tests fail (its optional Mean output): compiled, with a
    warning that names it and ``source.prepared.unverified_ops``; a graph of claimed operators gets neither."""
    from xpuc.runtime.artifact import read_manifest

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])
    inits = [numpy_helper.from_array(np.ones(8, np.float32), "scale"),
             numpy_helper.from_array(np.zeros(8, np.float32), "bias")]
    ln = helper.make_graph([helper.make_node("LayerNormalization", ["x", "scale", "bias"], ["n"]),
                            helper.make_node("Relu", ["n"], ["y"])], "g", [x], [y], initializer=inits)
    path = _save(helper.make_model(ln, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "ln.onnx")
    r = _xpuc("compile", path, "-o", tmp_path / "ln")
    assert r.returncode == 0, r.stderr
    assert "xpuc: warning:" in r.stderr and "outside xpuc's verified set" in r.stderr, r.stderr
    assert "LayerNormalization" in r.stderr
    assert read_manifest(tmp_path / "ln").source["prepared"]["unverified_ops"] == ["LayerNormalization"]
    xv = np.random.default_rng(1).standard_normal((2, 8)).astype(np.float32)
    np.savez(tmp_path / "in.npz", x=xv)
    r = _xpuc("run", tmp_path / "ln", "--inputs", tmp_path / "in.npz", "--output", tmp_path / "o.npz")
    assert r.returncode == 0, r.stderr
    mu, sd = xv.mean(1, keepdims=True), np.sqrt(xv.var(1, keepdims=True) + 1e-5)
    np.testing.assert_allclose(np.load(tmp_path / "o.npz")["y"], np.maximum((xv - mu) / sd, 0), rtol=1e-4, atol=1e-5)
    path = _save(_computed_reshape(), tmp_path / "claimed.onnx")
    r = _xpuc("compile", path, "--input-shape", "x=3,4,6", "-o", tmp_path / "claimed")
    assert r.returncode == 0 and "verified set" not in r.stderr, r.stderr
    assert "unverified_ops" not in read_manifest(tmp_path / "claimed").source["prepared"]


def test_scikit_learn_operators_are_rewritten_and_match_onnxruntime(tmp_path):
    """A skl2onnx-style pipeline: Scaler (StandardScaler) -> LinearRegressor (two targets), and column selection
    (ArrayFeatureExtractor) -> Binarizer; compiled by ``xpuc compile`` as shipped, run by ``xpuc run``."""
    ort = pytest.importorskip("onnxruntime")
    from xpuc.runtime.artifact import read_manifest

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])
    outs = [helper.make_tensor_value_info("pred", TensorProto.FLOAT, [None, 2]),
            helper.make_tensor_value_info("bits", TensorProto.FLOAT, [None, 2])]
    ml = "ai.onnx.ml"
    nodes = [helper.make_node("Scaler", ["x"], ["s"], domain=ml, offset=[0.5, -1.0, 2.0, 0.0],
                              scale=[2.0, 0.5, 1.5, 1.0]),
             helper.make_node("LinearRegressor", ["s"], ["pred"], domain=ml, targets=2,
                              coefficients=[0.1, -0.2, 0.3, 0.4, 1.0, 0.0, -1.0, 0.5], intercepts=[0.25, -0.75]),
             helper.make_node("ArrayFeatureExtractor", ["x", "cols"], ["picked"], domain=ml),
             helper.make_node("Binarizer", ["picked"], ["bits"], domain=ml, threshold=0.1)]
    g = helper.make_graph(nodes, "pipeline", [x], outs,
                          initializer=[numpy_helper.from_array(np.array([3, 1], np.int64), "cols")])
    path = _save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid(ml, 1)]),
                 tmp_path / "skl.onnx")
    r = _xpuc("compile", path, "--input-shape", "x=5,4", "-o", tmp_path / "art")
    assert r.returncode == 0, r.stderr
    assert read_manifest(tmp_path / "art").source["prepared"]["lowered_ml"] == {
        "Scaler": 1, "LinearRegressor": 1, "ArrayFeatureExtractor": 1, "Binarizer": 1}
    xv = np.random.default_rng(4).standard_normal((5, 4)).astype(np.float32)
    np.savez(tmp_path / "in.npz", x=xv)
    r = _xpuc("run", tmp_path / "art", "--inputs", tmp_path / "in.npz", "--output", tmp_path / "o.npz")
    assert r.returncode == 0, r.stderr
    want = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": xv})
    got = np.load(tmp_path / "o.npz")
    np.testing.assert_allclose(got["pred"], want[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(got["bits"], want[1])

    bad = helper.make_model(helper.make_graph(
        [helper.make_node("LinearRegressor", ["x"], ["pred"], domain=ml, targets=3, coefficients=[1.0] * 8)],
        "bad", [x], outs[:1]), opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid(ml, 1)])
    r = _xpuc("compile", _save(bad, tmp_path / "bad.onnx"), "-o", tmp_path / "bad")
    assert r.returncode == 2 and "Traceback" not in r.stderr and "malformed ai.onnx.ml.LinearRegressor" in r.stderr
