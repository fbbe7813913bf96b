"""ONNX frontend: an ONNX graph -> Relax module through ``tvm.relax.frontend.onnx`` (symbolic dims kept).

Checks first, so that a bad model fails with one clear line: the ONNX checker, then every operator of
the graph against the converter's table — unsupported operators are all reported at once, by name.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from xpuc.runtime.errors import XpucError

# Operators xpuc claims: every single-operator node test that the `onnx` package ships for them passes
# through xpuc's ONNX path on the host (tests/compiler/test_onnx_node_cases.py), with the inputs that exporters
# emit as constants (shapes, axes, pads, ...) frozen into initializers. TVM's converter knows more
# operators; those fail some of their node tests and are not claimed. LSTM, GRU and RNN are not in TVM's
# converter: xpuc unrolls them before import (compiler/onnx_recurrent.py).
CLAIMED_OPS = frozenset((
    "Abs", "Acos", "Acosh", "Add", "And", "ArgMax", "ArgMin", "Asin", "Asinh", "Atan", "Atanh", "AveragePool",
    "BitwiseAnd", "BitwiseNot", "BitwiseOr", "BitwiseXor", "Ceil", "Clip", "Compress", "Concat", "Constant",
    "ConstantOfShape", "Conv", "Cos", "Cosh", "DepthToSpace", "Div", "DynamicQuantizeLinear", "Einsum", "Elu",
    "Equal", "Erf", "Exp", "Expand", "Flatten", "Floor", "Gather", "GatherElements", "GatherND", "Gelu",
    "GRU", "Gemm", "GlobalAveragePool", "GlobalMaxPool", "Greater", "GreaterOrEqual", "GridSample",
    "GroupNormalization", "HardSigmoid", "HardSwish", "Hardmax", "Identity", "InstanceNormalization", "IsNaN",
    "LRN", "LSTM", "LeakyRelu", "Less", "LessOrEqual", "Log", "LogSoftmax", "LpPool", "MatMul", "MatMulInteger", "Max",
    "Mean", "MeanVarianceNormalization", "Min", "Mish", "Mul", "Neg", "NonZero", "Not", "OptionalGetElement",
    "Or", "PRelu", "Pad", "RNN", "Range", "Reciprocal", "ReduceMean", "Relu", "Reshape", "Round", "Scatter",
    "ScatterElements", "ScatterND", "Selu", "Shrink", "Sigmoid", "Sign", "Sin", "Sinh", "Size", "Slice",
    "Softmax", "Softplus", "Softsign", "Sqrt", "Squeeze", "Sub", "Sum", "Tan", "Tanh", "ThresholdedRelu",
    "Tile", "Transpose", "Trilu", "Unique", "Unsqueeze", "Where", "Xor",
))
# Inputs (by position) that exporters emit as constants; node tests feed them as graph inputs.
STATIC_INPUTS = {"Reshape": [1], "ReduceMean": [1], "ReduceSum": [1], "ReduceMax": [1], "ReduceMin": [1],
                 "ReduceProd": [1], "Split": [1], "Pad": [1, 2, 3], "Expand": [1], "ConstantOfShape": [0],
                 "Resize": [1, 2, 3], "Slice": [1, 2, 3, 4], "Unsqueeze": [1], "Squeeze": [1], "Tile": [1],
                 "Range": [0, 1, 2], "Clip": [1, 2], "LSTM": [4], "GRU": [4], "RNN": [4]}


def supported_ops() -> set[str]:
    """Operator types the Relax ONNX converter of this TVM can convert."""
    from tvm.relax.frontend.onnx import onnx_frontend

    return set(onnx_frontend._get_convert_map())


def read_onnx(path: str | os.PathLike):
    import onnx

    path = Path(path)
    if not path.is_file():
        raise XpucError(f"{path}: no such file")
    try:
        model = onnx.load(str(path))
    except Exception as e:  # protobuf DecodeError and friends
        raise XpucError(f"{path}: not a readable ONNX model ({type(e).__name__})") from None
    return model


def unverified_ops(model) -> list[str]:
    """Operator types of ``model``'s graph that TVM's converter takes but xpuc does not claim (:data:`CLAIMED_OPS`):
    over the whole ONNX node suite (``benchmarks/onnx_node_suite.py``) some of their cases give wrong values."""
    return sorted({n.op_type for n in model.graph.node if n.domain in ("", "ai.onnx")} - CLAIMED_OPS)


def check_model(model, where: str = "model", ops: bool = True) -> None:
    """Run the ONNX checker and (with ``ops``) the operator-support check; raise XpucError listing every
    problem. Operators of other domains (``ai.onnx.ml``, vendor ops) are listed with their domain."""
    import onnx

    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else "invalid"
        raise XpucError(f"{where}: malformed ONNX graph ({first})") from None
    if not ops:
        return
    known = supported_ops()
    missing = sorted({n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}.{n.op_type}"
                      for n in model.graph.node if n.domain not in ("", "ai.onnx") or n.op_type not in known})
    if missing:
        raise XpucError(f"{where}: unsupported ONNX operators: {', '.join(missing)}")


def freeze_inputs(model, values: Mapping[str, np.ndarray]):
    """Turn graph inputs into initializers with the given values (shapes, axes, pads that exporters
    normally emit as constants); returns a new ModelProto."""
    import onnx
    from onnx import numpy_helper

    m = onnx.ModelProto()
    m.CopyFrom(model)
    keep = [i for i in m.graph.input if i.name not in values]
    del m.graph.input[:]
    m.graph.input.extend(keep)
    for name, v in values.items():
        m.graph.initializer.append(numpy_helper.from_array(np.asarray(v), name))
    return m


def import_onnx(model, where: str = "model"):
    """Checked import: ONNX ModelProto -> Relax IRModule (weights bound as constants, dims symbolic)."""
    from tvm.relax.frontend.onnx import from_onnx

    check_model(model, where)
    try:
        return from_onnx(model, keep_params_in_input=False)
    except Exception as e:
        msg = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise XpucError(f"{where}: cannot import ({msg[:200]})") from None
