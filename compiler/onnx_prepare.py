"""Prepare an ONNX graph as shipped for import: fixed input dims, shape inference and constant folding.

Exported graphs often compute shapes at run time (``Shape -> Gather -> Concat -> Reshape``) and leave input
dims anonymous (``?``, ``-1``) or named with characters that are not identifiers. TVM's ONNX converter needs
the shape operands of ``Reshape`` and friends as constants, and names for symbolic dims. This module

1. applies ``--input-shape NAME=DIMS`` overrides (checked against the graph: the input exists, the rank
   matches, a fixed dim of the graph is not changed),
2. names every remaining dynamic input dim (``<input>_d<axis>``), and
3. runs `onnxslim <https://github.com/inisis/OnnxSlim>`_ (ONNX shape inference, constant folding, dead-node
   and redundant-op elimination, Conv+BatchNorm folding), which turns computed shapes into constants.

What was done is returned as a dict for the artifact's manifest, so that a build says how its graph differs
from the file it came from.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Mapping

from xpuc.compiler.onnx_if import lower_if
from xpuc.compiler.onnx_ml import lower_ml_ops
from xpuc.compiler.onnx_recurrent import unroll_recurrent
from xpuc.runtime.errors import XpucError


def parse_input_shapes(specs: list[str] | None) -> dict[str, tuple[int, ...]]:
    """``["x=1,3,48,320", "mask=1,12"]`` -> ``{"x": (1, 3, 48, 320), ...}`` (an XpucError names a bad one)."""
    out: dict[str, tuple[int, ...]] = {}
    for spec in specs or []:
        name, sep, dims = spec.rpartition("=")
        if not sep or not name:
            raise XpucError(f"--input-shape {spec!r}: expected NAME=DIMS, e.g. x=1,3,224,224")
        try:
            shape = tuple(int(d) for d in dims.replace("x", ",").split(",") if d.strip()) if dims.strip() else ()
        except ValueError:
            raise XpucError(f"--input-shape {spec!r}: dims must be positive integers separated by commas") from None
        if any(d <= 0 for d in shape):
            raise XpucError(f"--input-shape {spec!r}: dims must be positive integers separated by commas")
        if name in out:
            raise XpucError(f"--input-shape: {name} given twice")
        out[name] = shape
    return out


def graph_inputs(model) -> list:
    """The graph's real inputs (ValueInfoProto), initializers that old exporters list as inputs left out."""
    inits = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def input_dims(value_info) -> list[int | str]:
    """Dims of a graph input: ints where fixed, names where symbolic, ``""`` where anonymous."""
    dims: list[int | str] = []
    for d in value_info.type.tensor_type.shape.dim:
        if d.HasField("dim_value") and d.dim_value > 0:
            dims.append(int(d.dim_value))
        else:
            dims.append(d.dim_param if d.HasField("dim_param") else "")
    return dims


def fix_input_shapes(model, shapes: Mapping[str, tuple[int, ...]], where: str = "model"):
    """A copy of ``model`` with the given inputs' dims fixed and every other dynamic dim given a name."""
    import onnx

    m = onnx.ModelProto()
    m.CopyFrom(model)
    inputs = {i.name: i for i in graph_inputs(m)}
    unknown = sorted(set(shapes) - set(inputs))
    if unknown:
        raise XpucError(f"{where}: --input-shape names {', '.join(unknown)}, which the graph does not take "
                        f"(its inputs: {', '.join(inputs) or 'none'})")
    for name, vi in inputs.items():
        tt = vi.type.tensor_type
        if not tt.HasField("shape"):
            if name in shapes:
                tt.shape.SetInParent()
                for _ in shapes[name]:
                    tt.shape.dim.add()
            else:
                continue  # rank unknown: left to the converter
        dims = input_dims(vi)
        if name in shapes:
            want = shapes[name]
            if len(want) != len(dims):
                raise XpucError(f"{where}: input {name} has {len(dims)} dims {_show(dims)}; "
                                f"--input-shape gives {len(want)}")
            for axis, (have, new) in enumerate(zip(dims, want, strict=True)):
                if isinstance(have, int) and have != new:
                    raise XpucError(f"{where}: input {name} dim {axis} is fixed at {have} in the graph; "
                                    f"--input-shape gives {new}")
        for axis, d in enumerate(tt.shape.dim):
            if name in shapes:
                d.Clear()
                d.dim_value = shapes[name][axis]
            elif not (d.HasField("dim_value") and d.dim_value > 0) and not _identifier(d.dim_param):
                d.Clear()
                d.dim_param = f"{_ident(name)}_d{axis}"
    return m


def prepare_graph(model, shapes: Mapping[str, tuple[int, ...]] | None = None, where: str = "model",
                  simplify: bool = True):
    """(prepared ModelProto, record for the manifest): input dims fixed / named, the numeric ``ai.onnx.ml``
    operators rewritten (:mod:`xpuc.compiler.onnx_ml`), simplified, data-dependent ``If`` nodes selected
    (:mod:`xpuc.compiler.onnx_if`), recurrent operators unrolled (:mod:`xpuc.compiler.onnx_recurrent`) and
    simplified again.

    A graph onnxslim cannot simplify (or one with sequence / optional inputs or outputs, which it does not
    handle) is imported as it is; the record's ``not_simplified`` says why.
    """

    shapes = dict(shapes or {})
    fixed = fix_input_shapes(model, shapes, where)
    record: dict = {"input_shapes": {k: list(v) for k, v in shapes.items()}, "nodes_in": len(model.graph.node)}
    fixed, lowered = lower_ml_ops(fixed, where)
    if lowered:
        record["lowered_ml"] = lowered
    if simplify and not all(_is_tensor(v) for v in [*graph_inputs(fixed), *fixed.graph.output]):
        record["not_simplified"] = "sequence or optional inputs/outputs"  # onnxslim handles tensors only
        simplify = False
    if simplify:
        fixed = _slim(fixed, record)  # folds the Ifs whose condition is known now
    fixed, selected = lower_if(fixed, where)
    if selected:
        record["if_as_select"] = selected
        if simplify and "not_simplified" not in record:
            fixed = _slim(fixed, record)
    # after folding, so that a recurrent node's input has the static shape its sequence length is read from
    fixed, unrolled = unroll_recurrent(fixed, where)
    if unrolled:
        record["unrolled"] = unrolled
        if simplify and "not_simplified" not in record:
            fixed = _slim(fixed, record)  # the unrolled weights' slices and transposes fold into constants
    record["nodes_out"] = len(fixed.graph.node)
    return fixed, record


def _slim(model, record: dict):
    """onnxslim's shape inference and constant folding of ``model``; ``model`` itself where onnxslim fails (the
    reason in ``record['not_simplified']``)."""
    import onnx
    import onnxslim

    slim = onnx.ModelProto()
    slim.CopyFrom(model)
    del slim.graph.value_info[:]  # stale once input dims changed; shape inference recomputes them
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            slim = onnxslim.slim(slim)
        if not isinstance(slim, onnx.ModelProto):
            raise ValueError("no graph returned")
        # onnxslim drops initializers from the input list; IR version 3 required them there (4+ do not)
        slim.ir_version = max(slim.ir_version, 4)
        onnx.checker.check_model(slim)
    except Exception as e:  # onnxslim fails in many ways on graphs it cannot infer: import them as they are
        msg = (str(e).strip().splitlines() or [type(e).__name__])[-1]
        record["not_simplified"] = f"onnxslim {onnxslim.__version__}: {msg[:160]}"
        return model
    record["simplified_by"] = f"onnxslim {onnxslim.__version__}"
    return slim


def _is_tensor(value_info) -> bool:
    return value_info.type.HasField("tensor_type")


def _identifier(name: str) -> bool:
    return bool(name) and name.isidentifier()


def _ident(name: str) -> str:
    s = "".join(c if c.isalnum() or c == "_" else "_" for c in name)
    return s if s and not s[0].isdigit() else f"in_{s}"


def _show(dims: list[int | str]) -> str:
    return "[" + ", ".join(str(d) if d != "" else "?" for d in dims) + "]"
