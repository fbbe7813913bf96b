"""The ``ai.onnx.ml`` operators of scikit-learn pipelines (skl2onnx) rewritten into standard ONNX operators.

TVM's converter knows no ``ai.onnx.ml`` operator. The numeric ones with a closed form become the claimed
operators that compute it, before shape inference and folding:

* ``Scaler`` (StandardScaler, MinMaxScaler, …): ``(X - offset) * scale``;
* ``LinearRegressor`` (LinearRegression, Ridge, …; ``post_transform`` NONE): ``X @ coefficientsᵀ + intercepts``;
* ``ArrayFeatureExtractor`` (column selection): ``Gather`` along the last axis;
* ``Binarizer``: ``X > threshold`` as X's type.

Anything else of the domain (classifiers with string labels, ``ZipMap``, trees, …) stays and is refused by the
operator check with its domain in the name.
"""

from __future__ import annotations

import numpy as np

from xpuc.runtime.errors import XpucError

ML_DOMAIN = "ai.onnx.ml"
LOWERED_ML_OPS = ("Scaler", "LinearRegressor", "ArrayFeatureExtractor", "Binarizer")


def _lower(node, k: int, where: str, types: dict) -> tuple[list, list]:
    from onnx import TensorProto, helper, numpy_helper

    a = {x.name: helper.get_attribute_value(x) for x in node.attribute}
    p = f"{node.name or node.output[0]}_ml{k}".replace("/", "_")
    x, y = node.input[0], node.output[0]
    nodes, inits = [], []

    def const(name: str, value) -> str:
        inits.append(numpy_helper.from_array(np.asarray(value), f"{p}_{name}"))
        return f"{p}_{name}"

    xf = f"{p}_x"
    if node.op_type == "ArrayFeatureExtractor":  # keeps X's type
        nodes.append(helper.make_node("Gather", [x, node.input[1]], [y], axis=-1))
        return nodes, inits
    nodes.append(helper.make_node("Cast", [x], [xf], to=TensorProto.FLOAT))
    if node.op_type == "Scaler":
        off = np.asarray(a.get("offset", [0.0]), np.float32)
        scale = np.asarray(a.get("scale", [1.0]), np.float32)
        nodes.append(helper.make_node("Sub", [xf, const("offset", off)], [f"{p}_c"]))
        nodes.append(helper.make_node("Mul", [f"{p}_c", const("scale", scale)], [y]))
    elif node.op_type == "LinearRegressor":
        post = a.get("post_transform", b"NONE")
        post = post.decode() if isinstance(post, bytes) else post
        if post != "NONE":
            raise XpucError(f"{where}: ai.onnx.ml.LinearRegressor with post_transform {post} is not supported")
        targets = int(a.get("targets", 1))
        coef = np.asarray(a["coefficients"], np.float32).reshape(targets, -1)
        icpt = np.asarray(a.get("intercepts", [0.0] * targets), np.float32)
        nodes.append(helper.make_node("MatMul", [xf, const("coef", coef.T.copy())], [f"{p}_m"]))
        nodes.append(helper.make_node("Add", [f"{p}_m", const("intercepts", icpt)], [y]))
    else:  # Binarizer: X's type, 1 where X > threshold
        thr = float(a.get("threshold", 0.0))
        nodes.append(helper.make_node("Greater", [xf, const("threshold", np.float32(thr))], [f"{p}_g"]))
        nodes.append(helper.make_node("Cast", [f"{p}_g"], [y], to=types.get(x, TensorProto.FLOAT)))
    return nodes, inits


def lower_ml_ops(model, where: str = "model"):
    """(model with the :data:`LOWERED_ML_OPS` of ``ai.onnx.ml`` rewritten, {op type: count}); ``model`` unchanged."""
    import onnx

    if not any(n.domain == ML_DOMAIN and n.op_type in LOWERED_ML_OPS for n in model.graph.node):
        return model, {}
    m = onnx.ModelProto()
    m.CopyFrom(model)
    inferred = onnx.shape_inference.infer_shapes(m)
    types = {v.name: v.type.tensor_type.elem_type for v in [*inferred.graph.input, *inferred.graph.value_info]
             if v.type.HasField("tensor_type")}
    nodes, counts = [], {}
    for k, node in enumerate(m.graph.node):
        if node.domain != ML_DOMAIN or node.op_type not in LOWERED_ML_OPS:
            nodes.append(node)
            continue
        try:
            new, inits = _lower(node, k, where, types)
        except (KeyError, ValueError) as e:  # a missing attribute, coefficients that do not fit the targets
            raise XpucError(f"{where}: malformed {ML_DOMAIN}.{node.op_type} '{node.name or node.output[0]}' "
                            f"({type(e).__name__}: {e})") from None
        nodes.extend(new)
        m.graph.initializer.extend(inits)
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    if not any(n.domain == ML_DOMAIN for n in m.graph.node):  # the domain's opset import is no longer needed
        keep = [o for o in m.opset_import if o.domain != ML_DOMAIN]
        del m.opset_import[:]
        m.opset_import.extend(keep)
    return m, counts
