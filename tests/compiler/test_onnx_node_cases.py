"""ONNX's own node test cases (shipped with the `onnx` package) through xpuc's ONNX path on the host,
for every operator xpuc claims; plus the frontend's bad-input handling."""

from __future__ import annotations

import warnings
from collections import defaultdict

import numpy as np
import pytest

from xpuc.compiler.frontend_onnx import CLAIMED_OPS, STATIC_INPUTS, check_model, freeze_inputs
from xpuc.runtime.errors import XpucError


def _cases():
    from onnx.backend.test.case import node

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        all_cases = node.collect_testcases(None)
    out = []
    for c in all_cases:
        ops = {n.op_type for n in c.model.graph.node}
        if len(ops) == 1 and next(iter(ops)) in CLAIMED_OPS:
            out.append((next(iter(ops)), c))
    return out


def _plain(arrays) -> bool:
    try:
        return all(np.asarray(a).dtype != object for a in arrays)
    except ValueError:
        return False


def test_every_claimed_op_passes_its_node_tests_through_the_cli_path(tmp_path):
    """Each case as `xpuc compile CASE.onnx` + `xpuc run --inputs in.npz --output out.npz` do it: the graph
    file compiled by xpuc's pipeline into an artifact, inputs and outputs through .npz files, run by the
    artifact runner (in this process, to keep the suite fast; the runtime-library-only process is tested
    below)."""
    import onnx

    from xpuc.compiler.build import compile_onnx
    from xpuc.runtime.graph import GraphRunner, load_npz, save_npz

    ran, failed = defaultdict(int), []
    for op, case in _cases():
        inputs, outputs = case.data_sets[0]
        if not _plain(list(inputs) + list(outputs)):
            continue  # string / sequence tensors: not part of a compiled graph's interface
        names = [i.name for i in case.model.graph.input]
        static = {names[k]: inputs[k] for k in STATIC_INPUTS.get(op, []) if k < min(len(names), len(inputs))}
        model = freeze_inputs(case.model, static) if static else case.model
        onnx.save(model, str(tmp_path / f"{case.name}.onnx"))
        try:
            runner = GraphRunner(compile_onnx(tmp_path / f"{case.name}.onnx", tmp_path / case.name, quiet=True))
        except XpucError as e:
            failed.append(f"{case.name}: {e}")
            continue
        feeds = {n: np.asarray(a) for n, a in zip(names, inputs, strict=False) if n not in static}
        save_npz(tmp_path / "in.npz", feeds)
        data = load_npz(tmp_path / "in.npz")
        outs = runner(*[data[n] for n in runner.inputs])
        save_npz(tmp_path / "out.npz", {f"out{k}": o for k, o in enumerate(outs)})
        got_all = load_npz(tmp_path / "out.npz")
        for k, want in enumerate(outputs):
            got, want = got_all[f"out{k}"], np.asarray(want)
            if got.shape != want.shape or not np.allclose(got.astype(np.float64), want.astype(np.float64),
                                                          rtol=1e-3, atol=1e-4, equal_nan=True):
                failed.append(f"{case.name}: output {k} {got.shape} vs {want.shape}")
        ran[op] += 1
    assert not failed, "\n".join(failed)
    assert set(ran) == set(CLAIMED_OPS), f"claimed but never run: {sorted(set(CLAIMED_OPS) - set(ran))}"
    assert sum(ran.values()) >= 300


def test_unsupported_ops_are_listed_together():
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])
    nodes = [helper.make_node("Celu", ["x"], ["a"]), helper.make_node("Swish", ["a"], ["b"]),
             helper.make_node("Relu", ["b"], ["y"])]
    m = helper.make_model(helper.make_graph(nodes, "g", [x], [y]), opset_imports=[helper.make_opsetid("", 24)])
    with pytest.raises(XpucError, match="unsupported ONNX operators: Celu, Swish"):
        check_model(m)
    assert onnx  # used above through helper


def test_malformed_graph():
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])
    m = helper.make_model(helper.make_graph([helper.make_node("Relu", ["missing"], ["y"])], "g", [x], [y]))
    with pytest.raises(XpucError, match="malformed ONNX graph"):
        check_model(m)


RUNTIME_ONLY_CASES = ["test_unique_not_sorted_without_axis", "test_unique_sorted_with_axis_3d",
                      "test_unique_bfloat16_sorted_without_axis", "test_nonzero_example", "test_size_example",
                      "test_gemm_default_scalar_bias", "test_compress_bfloat16", "test_range_int32_type_negative_delta"]


@pytest.mark.parametrize("name", RUNTIME_ONLY_CASES)
def test_node_case_through_xpuc_compile_and_xpuc_run(name, tmp_path):
    """The real commands in their own processes: `xpuc run` loads TVM's runtime library only, so operators
    whose host functions TVM registers from its compiler package (Unique, NonZero) need xpuc's; 0-d inputs,
    bfloat16 through .npz and data-dependent output shapes round-trip."""
    import subprocess
    import sys

    import onnx

    from xpuc.runtime.graph import load_npz, save_npz

    op, case = next((op, c) for op, c in _cases() if c.name == name)
    inputs, outputs = case.data_sets[0]
    names = [i.name for i in case.model.graph.input]
    static = {names[k]: inputs[k] for k in STATIC_INPUTS.get(op, []) if k < min(len(names), len(inputs))}
    onnx.save(freeze_inputs(case.model, static) if static else case.model, str(tmp_path / "g.onnx"))
    save_npz(tmp_path / "in.npz", {n: np.asarray(a) for n, a in zip(names, inputs, strict=False) if n not in static})
    cli = [sys.executable, "-m", "xpuc.compiler.cli"]
    r = subprocess.run([*cli, "compile", str(tmp_path / "g.onnx"), "-o", str(tmp_path / "art"), "--quiet"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([*cli, "run", str(tmp_path / "art"), "--inputs", str(tmp_path / "in.npz"), "--output",
                        str(tmp_path / "out.npz")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    got = load_npz(tmp_path / "out.npz")
    out_names = [o.name for o in case.model.graph.output]
    assert sorted(got) == sorted(out_names)
    for n, want in zip(out_names, outputs, strict=True):
        want = np.asarray(want)
        assert got[n].dtype == want.dtype and got[n].shape == want.shape, (n, got[n].dtype, got[n].shape)
        np.testing.assert_allclose(got[n].astype(np.float64), want.astype(np.float64), rtol=1e-3, atol=1e-4)


def test_runtime_library_alone_lacks_the_host_functions_that_xpuc_registers():
    """Guard for the test above: were TVM's runtime library to gain these functions, the registration (and
    this test) could go."""
    import os
    import subprocess
    import sys

    code = ("import tvm; from xpuc.runtime.graph_builtins import FUNCTIONS, register_missing; "
            "missing = [f for f in FUNCTIONS if tvm.get_global_func(f, allow_missing=True) is None]; "
            "print(len(missing), len(register_missing()))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={**os.environ, "TVM_USE_RUNTIME_LIB": "1"})
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["3", "3"]
