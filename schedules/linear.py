"""Dense linear kernels with fp16 weights and fp32 activations, written directly in TIR.

``y[0, t, i] = sum_k x[0, t, k] * float32(W[i, k]) (+ b[i])`` for a symbolic number of tokens ``t``.

Weights are stored **row-block packed**: ``Wp[ib, kb, r, l] = W[ib*R + r, kb*L + l]`` (see
:func:`pack_rows`), so each parallel task streams one contiguous region: for every ``kb`` the
``R`` rows' next ``L`` elements lie side by side.

Schedule (chosen by measurement; on this host it took the model-weighted decode GEMV time of
SmolLM2-135M from ~20 ms to ~13-16 ms per token):

* output rows are split into blocks of ``R`` rows, one block per parallel task;
* for one token (decode) the block is streamed once, widened to fp32 in registers, and accumulated in
  ``R`` independent ``L``-lane vector accumulators (kept in registers: they are allocated in the
  ``global`` scope, which TVM 0.27 lowers to a stack slot; ``local`` becomes a heap workspace per
  task) that share each activation load; one horizontal sum per row at the end;
* for several tokens (prefill) the block is widened to fp32 once into a scratch buffer and reused
  for every token, so the weight matrix is read from memory once per call.
"""

from __future__ import annotations

from functools import cache

import numpy as np
from tvm import tirx
from tvm.script import tirx as T


def largest_divisor(value: int, preferred: int) -> int:
    """Largest power of two <= ``preferred`` that divides ``value``."""
    d = preferred
    while d > 1 and value % d:
        d //= 2
    return d


def block_shape(in_features: int, out_features: int, lanes: int = 16, rows: int = 8) -> tuple[int, int]:
    """(R, L): rows per task and SIMD lanes for a matrix of this shape."""
    return largest_divisor(out_features, rows), largest_divisor(in_features, lanes)


def packed_shape(in_features: int, out_features: int, lanes: int = 16, rows: int = 8) -> tuple[int, ...]:
    R, L = block_shape(in_features, out_features, lanes, rows)
    return (out_features // R, in_features // L, R, L)


def pack_rows(w: np.ndarray, lanes: int = 16, rows: int = 8) -> np.ndarray:
    """(out, in) matrix -> (out/R, in/L, R, L) row-block packed copy."""
    n, k = w.shape
    R, L = block_shape(k, n, lanes, rows)
    return np.ascontiguousarray(w.reshape(n // R, R, k // L, L).transpose(0, 2, 1, 3))


def unpack_rows(wp: np.ndarray) -> np.ndarray:
    """Inverse of :func:`pack_rows`."""
    nb, kb, r, l = wp.shape
    return np.ascontiguousarray(wp.transpose(0, 2, 1, 3).reshape(nb * r, kb * l))


@cache
def linear_fp16(in_features: int, out_features: int, has_bias: bool = False,
                lanes: int = 16, rows: int = 8) -> tirx.PrimFunc:
    """Return the TIR PrimFunc of ``y = x @ W.T (+ b)`` with ``W`` fp16, row-block packed.

    Parameters
    ----------
    in_features, out_features:
        Static matrix shape. Neither needs to be a multiple of ``lanes`` or ``rows``: both are
        reduced to a power-of-two divisor (:func:`block_shape`).
    has_bias:
        Add an fp16 bias vector of ``out_features`` elements (qwen2's q/k/v projections).
    lanes:
        Preferred SIMD width in fp32 elements (16 = one AVX-512 register, 4 = one NEON register).
    rows:
        Output rows per parallel task; their accumulators share every activation load.

    Returns
    -------
    func : tirx.PrimFunc
        ``(x: (1, n, in) f32, Wp: packed_shape(in, out) f16[, b: (out,) f16], y: (1, n, out) f32)``.
    """
    K, N = in_features, out_features
    R, L = block_shape(K, N, lanes, rows)
    KB, NB = K // L, N // R
    @T.macro
    def halve(acc, half):
        if L > half:
            for r in T.unroll(R):
                for l in T.vectorized(half):
                    acc[r, l] = acc[r, l] + acc[r, l + half]

    @T.macro
    def rows_times_x(x, w, b, y, n, ib):
        """Rows ``ib*R .. ib*R+R`` of ``y`` for every token (plus the bias ``b`` unless it is None)."""
        acc = T.alloc_buffer((R, L), "float32", scope="global")
        if n == T.int64(1):
            for r in T.unroll(R):
                for l in T.vectorized(L):
                    acc[r, l] = T.float32(0)
            for kb in range(KB):
                for r in T.unroll(R):
                    for l in T.vectorized(L):
                        acc[r, l] = acc[r, l] + x[0, 0, kb * L + l] * T.Cast("float32", w[ib, kb, r, l])
            halve(acc, 8)  # L lanes halved down to one
            halve(acc, 4)
            halve(acc, 2)
            halve(acc, 1)
            for r in T.unroll(R):
                if b is not None:
                    y[0, 0, ib * R + r] = T.Cast("float32", b[ib * R + r]) + acc[r, 0]
                else:
                    y[0, 0, ib * R + r] = acc[r, 0]
        else:
            wblk = T.alloc_buffer((R, K), "float32", scope="global")
            for kb in range(KB):
                for r in range(R):
                    for l in T.vectorized(L):
                        wblk[r, kb * L + l] = T.Cast("float32", w[ib, kb, r, l])
            for t in range(n):
                for r in T.unroll(R):
                    for l in T.vectorized(L):
                        acc[r, l] = T.float32(0)
                for kb in range(KB):
                    for r in T.unroll(R):
                        for l in T.vectorized(L):
                            acc[r, l] = acc[r, l] + x[0, t, kb * L + l] * wblk[r, kb * L + l]
                for r in T.unroll(R):
                    if b is not None:
                        y[0, t, ib * R + r] = T.Cast("float32", b[ib * R + r])
                    else:
                        y[0, t, ib * R + r] = T.float32(0)
                    for l in range(L):
                        y[0, t, ib * R + r] = y[0, t, ib * R + r] + acc[r, l]

    # the two variants differ only by the bias: TVMScript needs both signatures spelled out
    if has_bias:

        @T.prim_func(private=True, s_tir=True)
        def linear_bias(var_x: T.handle, w: T.Buffer((NB, KB, R, L), "float16"),
                        b: T.Buffer((N,), "float16"), var_y: T.handle):
            T.func_attr({"tir.noalias": True, "tirx.is_scheduled": True})
            n = T.int64()
            x = T.match_buffer(var_x, (1, n, K), "float32")
            y = T.match_buffer(var_y, (1, n, N), "float32")
            with T.sblock("root"):
                for ib in T.parallel(NB):
                    rows_times_x(x, w, b, y, n, ib)

        return linear_bias

    @T.prim_func(private=True, s_tir=True)
    def linear(var_x: T.handle, w: T.Buffer((NB, KB, R, L), "float16"), var_y: T.handle):
        T.func_attr({"tir.noalias": True, "tirx.is_scheduled": True})
        n = T.int64()
        x = T.match_buffer(var_x, (1, n, K), "float32")
        y = T.match_buffer(var_y, (1, n, N), "float32")
        with T.sblock("root"):
            for ib in T.parallel(NB):
                rows_times_x(x, w, None, y, n, ib)

    return linear


@cache
def embedding_fp16(vocab: int, hidden: int, lanes: int = 16, rows: int = 8) -> tirx.PrimFunc:
    """Row gather ``y[0, t, :] = float32(W[ids[0, t], :])`` from a row-block packed fp16 table.

    The embedding shares its packed table with a tied LM head, so one copy of the weights serves
    both. Token ids must be in ``[0, vocab)``; the runtime checks them before the call.
    """
    R, L = block_shape(hidden, vocab, lanes, rows)
    KB, NB = hidden // L, vocab // R

    @T.prim_func(private=True, s_tir=True)
    def embedding(var_ids: T.handle, w: T.Buffer((NB, KB, R, L), "float16"), var_y: T.handle):
        T.func_attr({"tir.noalias": True})
        n = T.int64()
        ids = T.match_buffer(var_ids, (1, n), "int32")
        y = T.match_buffer(var_y, (1, n, hidden), "float32")
        with T.sblock("root"):
            for t in range(n):
                for kb in range(KB):
                    for l in T.vectorized(L):
                        y[0, t, kb * L + l] = T.Cast("float32", w[ids[0, t] // R, kb, ids[0, t] % R, l])

    return embedding
