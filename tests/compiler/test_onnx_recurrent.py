"""LSTM / GRU / RNN unrolled at a fixed sequence length (``compiler/onnx_recurrent.py``), through ``xpuc compile``
and ``xpuc run``, against onnxruntime; the cases ONNX's node suite has for them run in test_onnx_node_cases."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from xpuc.compiler.onnx_recurrent import unroll_recurrent
from xpuc.runtime.errors import XpucError

SEQ, BATCH, IN, H = 5, 2, 3, 4


def _xpuc(*args):
    return subprocess.run([sys.executable, "-m", "xpuc.compiler.cli", *map(str, args)], capture_output=True, text=True)


def _model(op: str, seq=SEQ, gates=4, dirs=2, **attrs):
    """One recurrent node over x [seq, batch, in] with constant weights, biases and initial state; every output."""
    rng = np.random.default_rng(0)
    direction = "bidirectional" if dirs == 2 else "forward"
    inits = [numpy_helper.from_array(rng.standard_normal((dirs, gates * H, IN)).astype(np.float32) * 0.5, "W"),
             numpy_helper.from_array(rng.standard_normal((dirs, gates * H, H)).astype(np.float32) * 0.5, "R"),
             numpy_helper.from_array(rng.standard_normal((dirs, 2 * gates * H)).astype(np.float32) * 0.1, "B"),
             numpy_helper.from_array(rng.standard_normal((dirs, BATCH, H)).astype(np.float32) * 0.1, "h0")]
    ins = ["x", "W", "R", "B", "", "h0"]
    outs = ["y", "yh"]
    if op == "LSTM":
        inits.append(numpy_helper.from_array(rng.standard_normal((dirs, BATCH, H)).astype(np.float32) * 0.1, "c0"))
        inits.append(numpy_helper.from_array(rng.standard_normal((dirs, 3 * H)).astype(np.float32) * 0.1, "P"))
        ins += ["c0", "P"]
        outs.append("yc")
    node = helper.make_node(op, ins, outs, hidden_size=H, direction=direction, **attrs)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [seq, BATCH, IN])
    y = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [seq, dirs, BATCH, H])]
    y += [helper.make_tensor_value_info(o, TensorProto.FLOAT, [dirs, BATCH, H]) for o in outs[1:]]
    g = helper.make_graph([node], "g", [x], y, initializer=inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 14)])


@pytest.mark.parametrize("op,gates,attrs", [("LSTM", 4, {"clip": 2.0}), ("GRU", 3, {"linear_before_reset": 1}),
                                            ("GRU", 3, {}), ("RNN", 1, {})])
def test_unrolled_recurrent_node_matches_onnxruntime_through_the_cli(tmp_path, op, gates, attrs):
    import onnx

    ort = pytest.importorskip("onnxruntime")
    model = _model(op, gates=gates, **attrs)
    path = tmp_path / "rnn.onnx"
    onnx.save(model, str(path))
    r = _xpuc("compile", path, "-o", tmp_path / "art")
    assert r.returncode == 0, r.stderr
    from xpuc.runtime.artifact import read_manifest

    assert read_manifest(tmp_path / "art").source["prepared"]["unrolled"] == {op: 1}
    x = np.random.default_rng(1).standard_normal((SEQ, BATCH, IN)).astype(np.float32)
    np.savez(tmp_path / "in.npz", x=x)
    r = _xpuc("run", tmp_path / "art", "--inputs", tmp_path / "in.npz", "--output", tmp_path / "out.npz")
    assert r.returncode == 0, r.stderr
    want = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    got = np.load(tmp_path / "out.npz")
    for name, w in zip([o.name for o in model.graph.output], want, strict=True):
        np.testing.assert_allclose(got[name], w, rtol=1e-4, atol=1e-5, err_msg=f"{op} {name}")


def test_symbolic_sequence_length_is_refused_until_fixed(tmp_path):
    import onnx

    ort = pytest.importorskip("onnxruntime")
    model = _model("GRU", seq="steps", gates=3)
    path = tmp_path / "gru.onnx"
    onnx.save(model, str(path))
    r = _xpuc("compile", path, "-o", tmp_path / "bad")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert [ln for ln in r.stderr.splitlines() if ln.startswith("xpuc: error:")] == r.stderr.splitlines()[-1:]
    assert "needs a fixed sequence length" in r.stderr and "--input-shape" in r.stderr
    assert not (tmp_path / "bad").exists()
    r = _xpuc("compile", path, "--input-shape", f"x=7,{BATCH},{IN}", "-o", tmp_path / "art")
    assert r.returncode == 0, r.stderr
    x = np.random.default_rng(2).standard_normal((7, BATCH, IN)).astype(np.float32)
    np.savez(tmp_path / "in.npz", x=x)
    r = _xpuc("run", tmp_path / "art", "--inputs", tmp_path / "in.npz", "--output", tmp_path / "o.npz")
    assert r.returncode == 0, r.stderr
    want = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    np.testing.assert_allclose(np.load(tmp_path / "o.npz")["y"], want[0], rtol=1e-4, atol=1e-5)


def test_what_the_unrolling_does_not_cover_is_refused_with_one_line():
    model = _model("LSTM", activations=["Relu", "Tanh", "Tanh"] * 2)
    with pytest.raises(XpucError, match="activations"):
        unroll_recurrent(model)
    model = _model("LSTM", input_forget=1)
    with pytest.raises(XpucError, match="input_forget"):
        unroll_recurrent(model)
    lens = _model("RNN", gates=1, dirs=1)
    lens.graph.initializer.append(numpy_helper.from_array(np.array([SEQ, SEQ - 1], np.int32), "lens"))
    lens.graph.node[0].input[4] = "lens"
    with pytest.raises(XpucError, match="sequence_lens"):
        unroll_recurrent(lens)
    for attr in ("hidden_size", "direction"):  # a malformed node is one error line, not a traceback
        bad = _model("GRU", gates=3, dirs=1)
        node = bad.graph.node[0]
        keep = [a for a in node.attribute if a.name != attr]
        del node.attribute[:]
        node.attribute.extend(keep)
        if attr == "direction":
            node.attribute.append(helper.make_attribute("direction", "sideways"))
        with pytest.raises(XpucError, match="malformed GRU"):
            unroll_recurrent(bad)
    plain = _model("RNN", gates=1, dirs=1)
    del plain.graph.node[:]
    plain.graph.node.append(helper.make_node("Relu", ["x"], ["y"]))
    assert unroll_recurrent(plain) == (plain, {})


def test_sequence_length_known_only_after_folding_a_computed_shape(tmp_path):
    """As in Silero VAD: the LSTM's input comes out of a Reshape whose shape the graph computes from its input;
    with --input-shape, folding fixes it and the LSTM unrolls."""
    import onnx

    ort = pytest.importorskip("onnxruntime")
    lstm = _model("LSTM", seq="steps")
    g = lstm.graph
    g.input[0].CopyFrom(helper.make_tensor_value_info("inp", TensorProto.FLOAT, ["steps", BATCH * IN]))
    g.initializer.extend([numpy_helper.from_array(np.array([0], np.int64), "zero"),
                          numpy_helper.from_array(np.array([BATCH, IN], np.int64), "tail")])
    g.node.insert(0, helper.make_node("Reshape", ["inp", "shape"], ["x"]))
    g.node.insert(0, helper.make_node("Concat", ["n", "tail"], ["shape"], axis=0))
    g.node.insert(0, helper.make_node("Gather", ["s", "zero"], ["n"], axis=0))
    g.node.insert(0, helper.make_node("Shape", ["inp"], ["s"]))
    path = tmp_path / "lstm.onnx"
    onnx.save(lstm, str(path))
    r = _xpuc("compile", path, "--input-shape", f"inp=6,{BATCH * IN}", "-o", tmp_path / "art")
    assert r.returncode == 0, r.stderr
    x = np.random.default_rng(3).standard_normal((6, BATCH * IN)).astype(np.float32)
    np.savez(tmp_path / "in.npz", inp=x)
    r = _xpuc("run", tmp_path / "art", "--inputs", tmp_path / "in.npz", "--output", tmp_path / "o.npz")
    assert r.returncode == 0, r.stderr
    want = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"inp": x})
    got = np.load(tmp_path / "o.npz")
    for name, w in zip(("y", "yh", "yc"), want, strict=True):
        np.testing.assert_allclose(got[name], w, rtol=1e-4, atol=1e-5, err_msg=name)
