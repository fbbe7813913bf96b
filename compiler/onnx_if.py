"""Data-dependent ONNX ``If`` nodes as a select: both branches inlined, ``Where(cond, then, else)`` per output.

onnxslim folds an ``If`` whose condition is known at compile time (:mod:`xpuc.compiler.onnx_prepare`); TVM's ONNX
converter has no ``If`` at all, so a condition computed from the inputs left the graph unimportable. ONNX
branches have no side effects, so where both branches' outputs have the same static shapes and types the node
equals computing both and selecting: each branch's nodes and initializers move into the main graph (the names
they define prefixed with the ``If`` node's, so they cannot collide; names from the enclosing scope keep
referring to it) and each output becomes ``Where(cond, then_i, else_i)``. ``If`` nodes nested in a branch are
lowered first. Both branches run, so a costly branch costs also when not taken.

A branch whose outputs' shapes differ or are not known after ONNX shape inference (a data-dependent shape; the
same named symbolic dims count as known), or that holds a ``Loop`` / ``Scan``, is refused with one error line
naming the node.
"""

from __future__ import annotations

from xpuc.runtime.errors import XpucError

__all__ = ["lower_if"]


def _inline(branch, prefix: str):
    """The branch's nodes and initializers with the names it defines prefixed, and its output names."""
    import onnx

    defined = {i.name for i in branch.initializer} | {o for n in branch.node for o in n.output if o}

    def rename(name: str) -> str:
        return prefix + name if name in defined else name

    nodes = []
    for n in branch.node:
        if n.op_type in ("Loop", "Scan") or any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
                                                for a in n.attribute):
            raise XpucError(f"a {n.op_type} node inside an If branch")
        c = onnx.NodeProto()
        c.CopyFrom(n)
        c.name = prefix + (n.name or n.op_type)
        c.input[:] = [rename(i) if i else i for i in n.input]
        c.output[:] = [rename(o) if o else o for o in n.output]
        nodes.append(c)
    inits = []
    for t in branch.initializer:
        c = onnx.TensorProto()
        c.CopyFrom(t)
        c.name = prefix + t.name
        inits.append(c)
    return nodes, inits, [rename(o.name) for o in branch.output]


def _lower_graph(graph, where: str, path: str) -> tuple[list, list, list[str]]:
    """(nodes, extra initializers, lowered If names) of ``graph`` with its If nodes (and nested ones) selected;
    ``path`` prefixes the names the lowering defines (a branch's own lowering uses none: inlining prefixes it)."""
    import onnx
    from onnx import helper

    nodes, inits, lowered = [], [], []
    for k, node in enumerate(graph.node):
        if node.op_type != "If" or node.domain not in ("", "ai.onnx"):
            nodes.append(node)
            continue
        name = node.name or f"If_{k}"
        branches = {a.name: a.g for a in node.attribute if a.type == onnx.AttributeProto.GRAPH}
        if set(branches) != {"then_branch", "else_branch"}:
            raise XpucError(f"{where}: If node '{name}' lacks a branch")
        parts = []
        for key in ("then_branch", "else_branch"):
            sub = onnx.GraphProto()
            sub.CopyFrom(branches[key])
            sub_nodes, sub_inits, sub_lowered = _lower_graph(sub, where, "")  # inlining prefixes its names
            del sub.node[:]
            sub.node.extend(sub_nodes)
            sub.initializer.extend(sub_inits)
            lowered += [f"{path}{name}/{key[:4]}/{n}" for n in sub_lowered]
            try:
                parts.append(_inline(sub, f"{path}{name}/{key[:4]}/"))
            except XpucError as e:
                raise XpucError(f"{where}: If node '{name}': {e} (xpuc selects between branches it can inline)") \
                    from None
        (tn, ti, to), (en, ei, eo) = parts
        if len(to) != len(node.output) or len(eo) != len(node.output):
            raise XpucError(f"{where}: If node '{name}': its branches do not give its {len(node.output)} outputs")
        nodes += tn + en
        inits += ti + ei
        nodes += [helper.make_node("Where", [node.input[0], t, e], [out], name=f"{path}{name}/select{i}")
                  for i, (t, e, out) in enumerate(zip(to, eo, node.output, strict=True))]
        lowered.append(path + name)
    return nodes, inits, lowered


def lower_if(model, where: str = "model"):
    """(model with every ``If`` node selected (module docstring), names of the lowered nodes); ``model`` itself when
    it has none."""
    import onnx

    if not any(n.op_type == "If" for n in model.graph.node):
        return model, []
    m = onnx.ModelProto()
    m.CopyFrom(model)
    nodes, inits, lowered = _lower_graph(m.graph, where, "")
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    m.graph.initializer.extend(inits)
    _check_shapes(m, where)
    return m, lowered


def _check_shapes(model, where: str) -> None:
    """Each select's two inputs must have one shape and type (static, or the same named dims), else the node's
    output would be a broadcast."""
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except (onnx.shape_inference.InferenceError, ValueError) as e:  # a malformed graph: one line, no traceback
        raise XpucError(f"{where}: ONNX shape inference failed after selecting its Ifs ({e})") from None
    known: dict[str, tuple | None] = {}
    for v in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
        t = v.type.tensor_type
        if v.type.HasField("tensor_type") and t.HasField("shape"):
            dims = tuple(d.dim_value if d.HasField("dim_value") else d.dim_param or None for d in t.shape.dim)
            known[v.name] = (t.elem_type, dims) if None not in dims else None
    known.update({t.name: (t.data_type, tuple(t.dims)) for t in inferred.graph.initializer})

    def shape(name: str):
        return known.get(name)

    for n in inferred.graph.node:
        if n.op_type == "Where" and "/select" in n.name:
            a, b = shape(n.input[1]), shape(n.input[2])
            if a is None or a != b:
                node = n.name.rsplit("/select", 1)[0]
                raise XpucError(f"{where}: If node '{node}': its branches give outputs of different or data-dependent "
                                f"shapes ({a} vs {b}); xpuc runs an If as a select between branches of one shape "
                                "(fixing the input dims with --input-shape may help)")
