"""Recurrent ONNX operators (LSTM, GRU, RNN) unrolled into primitive operators at a fixed sequence length.

TVM's Relax ONNX converter has no recurrent operators. With the sequence length known at compile time (from the
graph or ``--input-shape``) each recurrent node becomes, per direction, one MatMul of the whole sequence by the
input weights and, per time step, the gate arithmetic of the ONNX specification (MatMul by the recurrence
weights, Slice into gates, Sigmoid / Tanh, element-wise updates); the outputs are concatenated in the layout the
node declares. Everything the rewrite emits is an operator xpuc claims, so the rest of the ONNX path (shape
inference and constant folding, import, xpuc's pipeline) treats the result like any other graph.

Supported: directions forward / reverse / bidirectional, ``layout`` 0 and 1, biases, initial states, LSTM
peepholes, ``clip``, GRU's ``linear_before_reset``, the default activations, and ``sequence_lens`` when it is
absent or a constant equal to the sequence length everywhere. Anything else is refused with one line.
"""

from __future__ import annotations

import numpy as np

from xpuc.runtime.errors import XpucError

RECURRENT_OPS = ("LSTM", "GRU", "RNN")
_GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}
_DEFAULT_ACTIVATIONS = {"LSTM": ["Sigmoid", "Tanh", "Tanh"], "GRU": ["Sigmoid", "Tanh"], "RNN": ["Tanh"]}


class _Emitter:
    """Appends nodes and initializers with names unique to one recurrent node."""

    def __init__(self, prefix: str) -> None:
        self.prefix, self.nodes, self.inits, self.k = prefix, [], [], 0

    def name(self) -> str:
        self.k += 1
        return f"{self.prefix}__{self.k}"

    def const(self, value) -> str:
        from onnx import numpy_helper

        n = self.name()
        self.inits.append(numpy_helper.from_array(np.asarray(value), n))
        return n

    def op(self, op_type: str, *inputs: str, out: str | None = None, **attrs) -> str:
        from onnx import helper

        o = out or self.name()
        self.nodes.append(helper.make_node(op_type, list(inputs), [o], name=self.name(), **attrs))
        return o

    def slice(self, x: str, start: int, end: int, axis: int) -> str:
        return self.op("Slice", x, self.const(np.array([start], np.int64)), self.const(np.array([end], np.int64)),
                       self.const(np.array([axis], np.int64)))

    def take(self, x: str, index: int, axis: int) -> str:
        """``x`` at ``index`` along ``axis``, that axis removed."""
        return self.op("Gather", x, self.const(np.array(index, np.int64)), axis=axis)


def _attrs(node) -> dict:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _static_dims(model) -> dict[str, list[int | None]]:
    """Shapes of every value shape inference can see (None for dims it cannot fix)."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model)
    out = {}
    for v in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
        if v.type.HasField("tensor_type") and v.type.tensor_type.HasField("shape"):
            out[v.name] = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
                           for d in v.type.tensor_type.shape.dim]
    return out


def _check(node, a: dict, seq_lens, seq: int, where: str) -> None:
    what = f"{where}: {node.op_type} '{node.name or node.output[0]}'"
    acts = [s.decode() if isinstance(s, bytes) else s for s in a.get("activations", [])]
    dirs = 2 if a.get("direction", b"forward") in (b"bidirectional", "bidirectional") else 1
    if acts and acts != _DEFAULT_ACTIVATIONS[node.op_type] * dirs:
        raise XpucError(f"{what}: activations {acts} are not supported (only the defaults)")
    if a.get("input_forget", 0):
        raise XpucError(f"{what}: input_forget=1 is not supported")
    if seq_lens is not None and not np.all(seq_lens == seq):
        raise XpucError(f"{what}: sequence_lens other than the full length {seq} are not supported")


def _unroll(node, model_inits: dict, dims: dict, where: str) -> _Emitter:
    """The replacement of one recurrent node."""
    from onnx import numpy_helper

    a = _attrs(node)
    kind, layout = node.op_type, int(a.get("layout", 0))
    direction = a.get("direction", b"forward")
    direction = direction.decode() if isinstance(direction, bytes) else direction
    ins = list(node.input) + [""] * (8 - len(node.input))
    x_name, w_name, r_name, b_name, lens_name, h0_name = ins[:6]
    c0_name, p_name = (ins[6], ins[7]) if kind == "LSTM" else ("", "")
    shape = dims.get(x_name)
    seq = None if shape is None or len(shape) != 3 else shape[1 if layout else 0]
    if seq is None:
        raise XpucError(f"{where}: {kind} '{node.name or node.output[0]}' needs a fixed sequence length (the "
                        f"{'second' if layout else 'first'} dim of '{x_name}'); set it with --input-shape")
    lens = None
    if lens_name:
        if lens_name not in model_inits:
            raise XpucError(f"{where}: {kind} '{node.name or node.output[0]}': sequence_lens computed in the graph "
                            "is not supported")
        lens = numpy_helper.to_array(model_inits[lens_name])
    _check(node, a, lens, seq, where)
    hidden = int(a["hidden_size"])
    G = _GATES[kind]
    clip = a.get("clip")
    if direction not in ("forward", "reverse", "bidirectional") or layout not in (0, 1):
        raise ValueError(f"direction '{direction}', layout {layout}")
    dirs = ["forward", "reverse"] if direction == "bidirectional" else [direction]
    e = _Emitter(f"{node.name or node.output[0]}_unrolled".replace("/", "_"))
    xs = e.op("Transpose", x_name, perm=[1, 0, 2]) if layout else x_name  # [seq, batch, in]
    state_axis = 1 if layout else 0  # initial_h / initial_c: [dirs, batch, h] (layout 0) or [batch, dirs, h]

    def zeros() -> str:  # [batch, hidden] of zeros, batch possibly symbolic
        batch = e.slice(e.op("Shape", xs), 1, 2, 0)
        return e.op("ConstantOfShape", e.op("Concat", batch, e.const(np.array([hidden], np.int64)), axis=0),
                    value=numpy_helper.from_array(np.zeros(1, np.float32)))

    def act(op: str, v: str) -> str:
        if clip is not None:
            v = e.op("Clip", v, e.const(np.array(-clip, np.float32)), e.const(np.array(clip, np.float32)))
        return e.op(op, v)

    ys, hs, cs = [], [], []
    for d, dname in enumerate(dirs):
        w_t = e.op("Transpose", e.take(w_name, d, 0), perm=[1, 0])  # [in, G h]
        r = e.take(r_name, d, 0)  # [G h, h]
        r_t = e.op("Transpose", r, perm=[1, 0])  # [h, G h]
        xw = e.op("MatMul", xs, w_t)  # [seq, batch, G h]
        rb = None
        if b_name:
            b = e.take(b_name, d, 0)
            wb, rb = e.slice(b, 0, G * hidden, 0), e.slice(b, G * hidden, 2 * G * hidden, 0)
            xw = e.op("Add", xw, wb if kind != "LSTM" and kind != "RNN" else e.op("Add", wb, rb))
        h = e.take(h0_name, d, state_axis) if h0_name else zeros()
        c = (e.take(c0_name, d, state_axis) if c0_name else zeros()) if kind == "LSTM" else None
        if p_name:
            p = e.take(p_name, d, 0)
            pi, po, pf = (e.slice(p, k * hidden, (k + 1) * hidden, 0) for k in range(3))
        outs: dict[int, str] = {}
        steps = range(seq) if dname == "forward" else range(seq - 1, -1, -1)
        for t in steps:
            x_t = e.take(xw, t, 0)  # [batch, G h]
            if kind == "LSTM":
                g = e.op("Add", x_t, e.op("MatMul", h, r_t))
                gi, go, gf, gc = (e.slice(g, k * hidden, (k + 1) * hidden, 1) for k in range(4))
                if p_name:
                    gi, gf = e.op("Add", gi, e.op("Mul", pi, c)), e.op("Add", gf, e.op("Mul", pf, c))
                i_, f_, c_new = act("Sigmoid", gi), act("Sigmoid", gf), act("Tanh", gc)
                c = e.op("Add", e.op("Mul", f_, c), e.op("Mul", i_, c_new))
                if p_name:
                    go = e.op("Add", go, e.op("Mul", po, c))
                h = e.op("Mul", act("Sigmoid", go), e.op("Tanh", c))
            elif kind == "GRU":
                gz, gr, gh = (e.slice(x_t, k * hidden, (k + 1) * hidden, 1) for k in range(3))
                hr = e.op("MatMul", h, e.slice(r_t, 0, 2 * hidden, 1))  # z and r recurrences
                if rb is not None:
                    hr = e.op("Add", hr, e.slice(rb, 0, 2 * hidden, 0))
                z = act("Sigmoid", e.op("Add", gz, e.slice(hr, 0, hidden, 1)))
                rr = act("Sigmoid", e.op("Add", gr, e.slice(hr, hidden, 2 * hidden, 1)))
                rh_t = e.slice(r_t, 2 * hidden, 3 * hidden, 1)
                rbh = e.slice(rb, 2 * hidden, 3 * hidden, 0) if rb is not None else None
                if a.get("linear_before_reset", 0):
                    lin = e.op("MatMul", h, rh_t)
                    lin = e.op("Add", lin, rbh) if rbh is not None else lin
                    pre = e.op("Add", gh, e.op("Mul", rr, lin))
                else:
                    lin = e.op("MatMul", e.op("Mul", rr, h), rh_t)
                    pre = e.op("Add", gh, e.op("Add", lin, rbh) if rbh is not None else lin)
                cand = act("Tanh", pre)
                one = e.const(np.array(1.0, np.float32))
                h = e.op("Add", e.op("Mul", e.op("Sub", one, z), cand), e.op("Mul", z, h))
            else:
                h = act("Tanh", e.op("Add", x_t, e.op("MatMul", h, r_t)))
            outs[t] = h
        ys.append(e.op("Concat", *[e.op("Unsqueeze", outs[t], e.const(np.array([0], np.int64)))
                                    for t in range(seq)], axis=0))  # [seq, batch, h]
        hs.append(h)
        cs.append(c)
    y_name, yh_name = (list(node.output) + ["", "", ""])[:2]
    yc_name = (list(node.output) + ["", "", ""])[2] if kind == "LSTM" else ""
    one_axis = e.const(np.array([1], np.int64))
    zero_axis = e.const(np.array([0], np.int64))
    if y_name:  # [seq, dirs, batch, h]; layout 1: [batch, seq, dirs, h]
        y = e.op("Concat", *[e.op("Unsqueeze", v, one_axis) for v in ys], axis=1)
        e.op("Transpose", y, perm=[2, 0, 1, 3], out=y_name) if layout else e.op("Identity", y, out=y_name)
    for name, finals in ((yh_name, hs), (yc_name, cs)):
        if name:  # [dirs, batch, h]; layout 1: [batch, dirs, h]
            st = e.op("Concat", *[e.op("Unsqueeze", v, zero_axis) for v in finals], axis=0)
            e.op("Transpose", st, perm=[1, 0, 2], out=name) if layout else e.op("Identity", st, out=name)
    return e


def unroll_recurrent(model, where: str = "model"):
    """(model with every LSTM / GRU / RNN node unrolled, {op type: count}); ``model`` is left unchanged."""
    import onnx

    if not any(n.op_type in RECURRENT_OPS and n.domain in ("", "ai.onnx") for n in model.graph.node):
        return model, {}
    m = onnx.ModelProto()
    m.CopyFrom(model)
    dims = _static_dims(m)
    inits = {t.name: t for t in m.graph.initializer}
    nodes, counts = [], {}
    for node in m.graph.node:
        if node.op_type not in RECURRENT_OPS or node.domain not in ("", "ai.onnx"):
            nodes.append(node)
            continue
        try:
            e = _unroll(node, inits, dims, where)
        except (KeyError, ValueError, TypeError) as err:  # a missing hidden_size, an unknown direction, ...
            raise XpucError(f"{where}: malformed {node.op_type} '{node.name or node.output[0]}' "
                            f"({type(err).__name__}: {err})") from None
        nodes.extend(e.nodes)
        m.graph.initializer.extend(e.inits)
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    return m, counts
