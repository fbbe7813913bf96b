"""Numpy reference implementation of a ModelSpec: the oracle every test compares against."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Mapping

import numpy as np

from xpuc.compiler.spec import ModelSpec
from xpuc.runtime.formats.arch import ArchConfig


def route_tokens(x: np.ndarray, router: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` experts per row of ``x`` and their weights: softmax over the chosen logits (Mixtral)."""
    logits = x @ router.T
    top = np.argsort(-logits, axis=1, kind="stable")[:, :k]
    sel = np.take_along_axis(logits, top, 1)
    w = np.exp(sel - sel.max(1, keepdims=True))
    return top, (w / w.sum(1, keepdims=True)).astype(np.float32)


def apply_experts(x: np.ndarray, router: np.ndarray, k: int, expert) -> np.ndarray:
    """Route the rows of ``x`` (:func:`route_tokens`) and sum ``expert(e, rows)`` weighted per row."""
    top, weight = route_tokens(x, router, k)
    y = np.zeros_like(x)
    for e in range(router.shape[0]):
        rows, slot = np.nonzero(top == e)
        if rows.size:
            y[rows] += expert(e, x[rows]) * weight[rows, slot][:, None]
    return y


def rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    x = x.astype(np.float32)
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def rope(x: np.ndarray, positions: np.ndarray, theta: float) -> np.ndarray:
    """Rotate-half RoPE on (seq, heads, head_dim)."""
    hd = x.shape[-1]
    inv = 1.0 / (theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd))
    ang = positions[:, None].astype(np.float64) * inv[None, :]
    cos = np.cos(np.concatenate([ang, ang], -1)).astype(np.float32)[:, None, :]
    sin = np.sin(np.concatenate([ang, ang], -1)).astype(np.float32)[:, None, :]
    half = hd // 2
    rot = np.concatenate([-x[..., half:], x[..., :half]], -1)
    return x * cos + rot * sin


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def ffn_hidden(x: np.ndarray, gate: np.ndarray, up: np.ndarray, kind: str) -> np.ndarray:
    """A gated FFN's activations (the down projection's input), weights in (out, in) layout."""
    g = x @ gate.T
    u = x @ up.T
    if kind == "swiglu":
        return silu(g) * u
    if kind == "reglu":
        return np.maximum(g, 0) * u
    if kind == "drelu":
        return np.maximum(g, 0) * np.maximum(u, 0)
    raise ValueError(kind)


def ffn(x: np.ndarray, gate: np.ndarray, up: np.ndarray, down: np.ndarray, kind: str) -> np.ndarray:
    """Gated FFN of the given kind (weights in (out, in) layout)."""
    return ffn_hidden(x, gate, up, kind) @ down.T


def causal_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, q_offset: int) -> np.ndarray:
    """q: (s, nq, hd); k, v: (t, nkv, hd) with t = q_offset + s. Returns (s, nq, hd)."""
    s, nq, hd = q.shape
    t, nkv, _ = k.shape
    rep = nq // nkv
    k = np.repeat(k, rep, axis=1)
    v = np.repeat(v, rep, axis=1)
    scores = np.matmul(q.transpose(1, 0, 2), k.transpose(1, 2, 0)) / np.sqrt(hd)  # (h, s, t), BLAS
    mask = np.arange(t)[None, :] > (q_offset + np.arange(s))[:, None]
    scores = np.where(mask[None], -np.inf, scores)
    scores = scores - scores.max(-1, keepdims=True)
    p = np.exp(scores)
    p /= p.sum(-1, keepdims=True)
    return np.matmul(p, v.transpose(1, 0, 2)).transpose(1, 0, 2).astype(np.float32)


RESIDENT_LIMIT = 6 << 30  # float32 weights above this are loaded on use (ReferenceModel), not all at once
RESIDENT_CACHE = 2 << 30  # ... and the most recently used kept up to this many bytes


class WeightCache(Mapping):
    """Weights as float32 (rounded through ``weight_dtype`` first), loaded on first use; the most recently used
    are kept up to ``budget`` bytes, so a model larger than memory is run one layer (one expert) at a time."""

    def __init__(self, weights: Mapping[str, np.ndarray], names, weight_dtype: str, budget: int) -> None:
        self._src, self._names, self._dtype, self._budget = weights, dict.fromkeys(names), weight_dtype, budget
        self._kept: OrderedDict[str, np.ndarray] = OrderedDict()
        self._bytes = 0

    def __getitem__(self, name: str) -> np.ndarray:
        if name in self._kept:
            self._kept.move_to_end(name)
            return self._kept[name]
        if name not in self._names:
            raise KeyError(name)
        arr = _as_float32(self._src[name], self._dtype)
        self._kept[name] = arr
        self._bytes += arr.nbytes
        while self._bytes > self._budget and len(self._kept) > 1:
            self._bytes -= self._kept.popitem(last=False)[1].nbytes
        return arr

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def _as_float32(arr: np.ndarray, weight_dtype: str) -> np.ndarray:
    if weight_dtype != "float32":
        arr = arr.astype(weight_dtype)
    return arr.astype(np.float32)


class ReferenceModel:
    """Float32 numpy forward pass with a KV cache.

    Parameters
    ----------
    spec:
        The model.
    weight_dtype:
        ``"float16"`` rounds every weight through fp16 first, the storage the compiled model uses, so
        the two differ only by arithmetic order.
    resident_bytes:
        Load every weight at once when their float32 size is at most this (default ``RESIDENT_LIMIT``);
        otherwise through a :class:`WeightCache` of ``RESIDENT_CACHE`` bytes (each weight is then loaded
        again on each pass: :meth:`forward_windows` makes one pass for many windows).
    """

    def __init__(self, spec: ModelSpec, weight_dtype: str = "float32", resident_bytes: int | None = None) -> None:
        self.config: ArchConfig = spec.config
        shapes = spec.config.weight_shapes()
        total = 4 * sum(int(np.prod(s)) for s in shapes.values())
        if total > (RESIDENT_LIMIT if resident_bytes is None else resident_bytes):
            self.w = WeightCache(spec.weights, shapes, weight_dtype, RESIDENT_CACHE)
        else:
            self.w = {name: _as_float32(spec.weights[name], weight_dtype) for name in shapes}
        self.reset()

    def reset(self) -> None:
        c = self.config
        self.k_cache = [np.zeros((0, c.num_kv_heads, c.head_dim), np.float32) for _ in range(c.num_layers)]
        self.v_cache = [np.zeros((0, c.num_kv_heads, c.head_dim), np.float32) for _ in range(c.num_layers)]

    @property
    def position(self) -> int:
        return self.k_cache[0].shape[0]

    def attention_block(self, i: int, h: np.ndarray, positions: np.ndarray,
                        keep_cache: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Layer ``i``'s attention half: the hidden states after it and the FFN's normalised input.

        ``keep_cache=False`` attends over these tokens alone (positions from 0) and leaves the KV cache as it was
        (the model generator calibrates one layer at a time this way).
        """
        c, w, p = self.config, self.w, f"layers.{i}."
        x = self.projection_input("attn", i, rms_norm(h, w[p + "attn_norm"], c.rms_norm_eps))
        q, k, v = x @ w[p + "q_proj"].T, x @ w[p + "k_proj"].T, x @ w[p + "v_proj"].T
        if c.qkv_bias:
            q, k, v = q + w[p + "q_bias"], k + w[p + "k_bias"], v + w[p + "v_bias"]
        s = h.shape[0]
        q = rope(q.reshape(s, c.num_heads, c.head_dim), positions, c.rope_theta)
        k = rope(k.reshape(s, c.num_kv_heads, c.head_dim), positions, c.rope_theta)
        v = v.reshape(s, c.num_kv_heads, c.head_dim)
        offset = 0
        if keep_cache:
            offset = self.k_cache[i].shape[0]
            self.k_cache[i] = k = np.concatenate([self.k_cache[i], k])
            self.v_cache[i] = v = np.concatenate([self.v_cache[i], v])
        a = self.projection_input("o", i, causal_attention(q, k, v, offset).reshape(s, -1))
        h = h + a @ w[p + "o_proj"].T
        return h, rms_norm(h, w[p + "ffn_norm"], c.rms_norm_eps)

    def layer(self, i: int, h: np.ndarray, positions: np.ndarray) -> np.ndarray:
        h, x = self.attention_block(i, h, positions)
        return h + self.ffn_block(i, x)

    def ffn_block(self, i: int, x: np.ndarray) -> np.ndarray:
        """Layer ``i``'s FFN on its normalised input: its unit, or the routed experts' units weighted."""
        c = self.config
        if not c.is_moe:
            return self.unit_ffn(i, x)
        return apply_experts(x, self.w[f"layers.{i}.router"], c.experts_per_token,
                             lambda e, rows: self.unit_ffn(i * c.num_experts + e, rows))

    def unit_ffn(self, u: int, x: np.ndarray) -> np.ndarray:
        """FFN unit ``u`` (a layer's FFN or one expert) on the rows ``x`` (subclasses make it sparse)."""
        p = self.config.ffn_prefix(u)
        x = self.projection_input("ffn", u, x)
        h = ffn_hidden(x, self.w[p + "gate_proj"], self.w[p + "up_proj"], self.config.ffn_kind)
        return self.projection_input("down", u, h) @ self.w[p + "down_proj"].T

    def projection_input(self, point: str, index: int, x: np.ndarray) -> np.ndarray:
        """The input of a projection, as the model uses it: ``point`` is ``attn`` (Q/K/V), ``o``, ``ffn``
        (gate/up) or ``down``; ``index`` the layer (the FFN unit for ``ffn`` / ``down``). The identity here;
        subclasses record or sparsify the inputs (:mod:`xpuc.compiler.act_sparsity`)."""
        return x

    def forward(self, ids: list[int] | np.ndarray) -> np.ndarray:
        """Run ``ids`` after what is already cached; returns logits (len(ids), vocab)."""
        c = self.config
        ids = np.asarray(ids, dtype=np.int64)
        positions = self.position + np.arange(len(ids))
        h = self.w["embed_tokens"][ids]
        for i in range(c.num_layers):
            h = self.layer(i, h, positions)
        h = rms_norm(h, self.w["final_norm"], c.rms_norm_eps)
        head = self.w["embed_tokens"] if c.tie_embeddings else self.w["lm_head"]
        return (h @ head.T).astype(np.float32)

    def layer_passes(self, windows: list[np.ndarray]) -> Iterator[tuple[int, list[np.ndarray]]]:
        """Run each window of token ids on its own (from position 0, the cache untouched), layer by layer over
        all windows, so that each layer's weights are used once for all of them; yields ``(i, hidden states
        per window after layer i)``."""
        windows = [np.asarray(ids, dtype=np.int64) for ids in windows]
        emb = self.w["embed_tokens"]
        hs = [emb[ids] for ids in windows]
        bounds = np.cumsum([0] + [len(ids) for ids in windows])
        for i in range(self.config.num_layers):
            att = [self.attention_block(i, h, np.arange(len(h)), keep_cache=False) for h in hs]
            y = self.ffn_block(i, np.concatenate([x for _, x in att]))
            hs = [h + y[a:b] for (h, _), a, b in zip(att, bounds[:-1], bounds[1:], strict=True)]
            yield i, hs

    def forward_windows(self, windows: list[np.ndarray]) -> list[np.ndarray]:
        """Logits of each window on its own (:meth:`layer_passes`)."""
        c = self.config
        hs = [np.zeros((0, c.hidden_size), np.float32)] * len(windows)
        for _i, out in self.layer_passes(windows):
            hs = out
        head = self.w["embed_tokens"] if c.tie_embeddings else self.w["lm_head"]
        return [(rms_norm(h, self.w["final_norm"], c.rms_norm_eps) @ head.T).astype(np.float32) for h in hs]

    def generate_greedy(self, ids: list[int], max_new_tokens: int, eos_ids: list[int] = ()) -> list[int]:
        self.reset()
        logits = self.forward(ids)[-1]
        out: list[int] = []
        for _ in range(max_new_tokens):
            t = int(np.argmax(logits))
            out.append(t)
            if t in eos_ids:
                break
            logits = self.forward([t])[-1]
        return out
