"""Write the dense prefill graph of a decoder (SmolLM2-shaped by default) as an ONNX model.

The graph maps hidden states ``x (1, seq, d)`` to hidden states after ``num_layers`` decoder layers
(RMSNorm, Q/K/V projections, rotate-half RoPE, causal softmax attention with grouped K/V heads, output
projection, SwiGLU FFN, residuals), ``seq`` symbolic. RoPE tables ``cos``/``sin`` ``(seq, head_dim)`` and
the additive causal ``mask (seq, seq)`` are inputs. It is the common ground on which xpuc's ONNX path and
onnxruntime are compared (tests and ``benchmarks/prefill.py``).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from xpuc.runtime.artifact import atomic_path
from xpuc.runtime.formats.arch import ArchConfig


def rope_tables(seq: int, head_dim: int, theta: float) -> tuple[np.ndarray, np.ndarray]:
    inv = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    ang = np.arange(seq)[:, None] * inv[None, :]
    ang = np.concatenate([ang, ang], -1)
    return np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)


def causal_mask(seq: int) -> np.ndarray:
    return np.triu(np.full((seq, seq), -1e9, np.float32), 1)


def decoder_prefill_onnx(path: str | os.PathLike, config: ArchConfig, weights: dict[str, np.ndarray] | None) -> Path:
    """Write the ONNX graph; ``weights`` uses the canonical names of :mod:`xpuc.compiler.spec`.

    With ``weights=None`` the weights become graph inputs (named as in the spec, matrices stored
    (in, out)): the graph then carries shapes only — what tuning needs — and stays small for 7B shapes.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    c = config
    H, KV, hd, d = c.num_heads, c.num_kv_heads, c.head_dim, c.hidden_size
    nodes, inits, weight_inputs = [], [], []
    counter = [0]
    shapes = c.weight_shapes()

    def name(prefix: str) -> str:
        counter[0] += 1
        return f"{prefix}_{counter[0]}"

    def const(arr: np.ndarray, prefix: str = "c") -> str:
        n = name(prefix)
        inits.append(numpy_helper.from_array(np.asarray(arr), n))
        return n

    def node(op: str, inputs: list[str], **attrs) -> str:
        out = name(op.lower())
        nodes.append(helper.make_node(op, inputs, [out], **attrs))
        return out

    def weight(key: str, transpose: bool = False) -> str:
        if weights is None:
            shape = list(shapes[key])[::-1] if transpose else list(shapes[key])
            weight_inputs.append(helper.make_tensor_value_info(key.replace(".", "_"), TensorProto.FLOAT, shape))
            return key.replace(".", "_")
        w = weights[key].astype(np.float32)
        return const(np.ascontiguousarray(w.T) if transpose else w, "w")

    def rms_norm(x: str, key: str) -> str:
        var = node("ReduceMean", [node("Mul", [x, x]), const(np.array([-1], np.int64))], keepdims=1)
        eps = const(np.float32(c.rms_norm_eps))
        inv = node("Div", [const(np.float32(1.0)), node("Sqrt", [node("Add", [var, eps])])])
        return node("Mul", [node("Mul", [x, inv]), weight(key)])

    def linear(x: str, key: str) -> str:
        return node("MatMul", [x, weight(key, transpose=True)])

    def heads(x: str, n: int) -> str:  # (1, s, n*hd) -> (1, n, s, hd)
        return node("Transpose", [node("Reshape", [x, const(np.array([1, -1, n, hd], np.int64))])], perm=[0, 2, 1, 3])

    def rope(x: str) -> str:
        half = hd // 2
        x1 = node("Slice", [x, const(np.array([0], np.int64)), const(np.array([half], np.int64)),
                            const(np.array([3], np.int64))])
        x2 = node("Slice", [x, const(np.array([half], np.int64)), const(np.array([hd], np.int64)),
                            const(np.array([3], np.int64))])
        rot = node("Concat", [node("Neg", [x2]), x1], axis=3)
        return node("Add", [node("Mul", [x, "cos"]), node("Mul", [rot, "sin"])])

    h = "x"
    for i in range(c.num_layers):
        p = f"layers.{i}."
        a = rms_norm(h, p + "attn_norm")
        q = rope(heads(linear(a, p + "q_proj"), H))
        k = rope(heads(linear(a, p + "k_proj"), KV))
        v = heads(linear(a, p + "v_proj"), KV)
        if H != KV:  # grouped K/V: head j of the KV group serves query heads j*rep .. j*rep+rep-1
            rep = H // KV
            axis2 = const(np.array([2], np.int64))
            k = node("Reshape", [node("Concat", [node("Unsqueeze", [k, axis2])] * rep, axis=2),
                                 const(np.array([1, H, -1, hd], np.int64))])
            v = node("Reshape", [node("Concat", [node("Unsqueeze", [v, axis2])] * rep, axis=2),
                                 const(np.array([1, H, -1, hd], np.int64))])
        scores = node("Mul", [node("MatMul", [q, node("Transpose", [k], perm=[0, 1, 3, 2])]),
                              const(np.float32(hd ** -0.5))])
        attn = node("MatMul", [node("Softmax", [node("Add", [scores, "mask"])], axis=-1), v])
        attn = node("Reshape", [node("Transpose", [attn], perm=[0, 2, 1, 3]),
                                const(np.array([1, -1, H * hd], np.int64))])
        h = node("Add", [h, linear(attn, p + "o_proj")])
        f = rms_norm(h, p + "ffn_norm")
        g = linear(f, p + "gate_proj")
        u = linear(f, p + "up_proj")
        act = node("Mul", [g, node("Sigmoid", [g])])
        h = node("Add", [h, linear(node("Mul", [act, u]), p + "down_proj")])
    nodes.append(helper.make_node("Identity", [h], ["y"]))
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "seq", d]),
              helper.make_tensor_value_info("cos", TensorProto.FLOAT, ["seq", hd]),
              helper.make_tensor_value_info("sin", TensorProto.FLOAT, ["seq", hd]),
              helper.make_tensor_value_info("mask", TensorProto.FLOAT, ["seq", "seq"])] + weight_inputs
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "seq", d])]
    graph = helper.make_graph(nodes, "decoder_prefill", inputs, outputs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], producer_name="xpuc",
                              ir_version=9)  # readable by every onnxruntime release of the last years
    onnx.checker.check_model(model)

    path = Path(path)
    with atomic_path(path) as tmp:
        onnx.save(model, str(tmp))
    return path
