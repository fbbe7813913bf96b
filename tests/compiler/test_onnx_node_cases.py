"""ONNX's own node test cases (shipped with the `onnx` package) through xpuc's ONNX path on the host,
for every operator xpuc claims; plus the frontend's bad-input handling."""

from __future__ import annotations

import warnings
from collections import defaultdict

import numpy as np
import pytest
import tvm
from tvm import relax

from xpuc.compiler.frontend_onnx import CLAIMED_OPS, STATIC_INPUTS, check_model, freeze_inputs, import_onnx
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


def test_every_claimed_op_passes_its_node_tests():
    target = tvm.target.Target({"kind": "llvm"})
    ran, failed = defaultdict(int), []
    for op, case in _cases():
        inputs, outputs = case.data_sets[0]
        if not _plain(list(inputs) + list(outputs)):
            continue  # string / sequence tensors: not part of a compiled graph's interface
        names = [i.name for i in case.model.graph.input]
        static = {names[k]: inputs[k] for k in STATIC_INPUTS.get(op, []) if k < min(len(names), len(inputs))}
        model = freeze_inputs(case.model, static) if static else case.model
        vm = relax.VirtualMachine(tvm.compile(import_onnx(model, case.name), target=target), tvm.cpu())
        out = vm["main"](*[tvm.runtime.tensor(np.asarray(a)) for k, a in enumerate(inputs) if names[k] not in static])
        outs = [out] if hasattr(out, "numpy") else list(out)
        for got, want in zip(outs, outputs, strict=False):
            got, want = got.numpy(), np.asarray(want)
            if got.shape != want.shape or not np.allclose(got.astype(np.float64), want.astype(np.float64),
                                                          rtol=1e-3, atol=1e-4, equal_nan=True):
                failed.append(case.name)
        ran[op] += 1
    assert not failed, failed
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
