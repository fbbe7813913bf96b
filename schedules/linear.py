"""Dense linear kernels with fp16 weights and fp32 activations, written directly in TIR.

``y[0, t, i] = sum_k x[0, t, k] * float32(w[i, k]) (+ b[i])`` for a symbolic number of tokens ``t``.

Schedule (chosen by measurement on AVX-512 and NEON-shaped loops):

* output rows are split into blocks of ``rows`` rows, one block per parallel task;
* for one token (decode) every weight row is streamed once with contiguous ``lanes``-wide loads,
  widened to fp32 in registers, and accumulated in ``rows`` independent vector accumulators that
  share each activation load; one horizontal sum per row at the end;
* for several tokens (prefill) the row block is widened to fp32 once into a local buffer and reused
  for every token, so the weight matrix is read from memory once per call.
"""

from __future__ import annotations

from functools import cache

from tvm import tirx
from tvm.script import tirx as T


def largest_divisor(value: int, preferred: int) -> int:
    """Largest power of two <= ``preferred`` that divides ``value``."""
    d = preferred
    while d > 1 and value % d:
        d //= 2
    return d


@cache
def linear_fp16(in_features: int, out_features: int, has_bias: bool = False,
                lanes: int = 16, rows: int = 8) -> tirx.PrimFunc:
    """Return the TIR PrimFunc of ``y = x @ w.T (+ b)`` with ``w`` fp16 of shape (out, in).

    Parameters
    ----------
    in_features, out_features:
        Static matrix shape. Neither needs to be a multiple of ``lanes`` or ``rows``: both are
        reduced to a power-of-two divisor.
    has_bias:
        Add an fp16 bias vector of ``out_features`` elements (qwen2's q/k/v projections).
    lanes:
        Preferred SIMD width in fp32 elements (16 = one AVX-512 register, 4 = one NEON register).
    rows:
        Output rows per parallel task; their accumulators share every activation load.

    Returns
    -------
    func : tirx.PrimFunc
        ``(x: (1, n, in) f32, w: (out, in) f16[, b: (out,) f16], y: (1, n, out) f32)``.
    """
    K, N = in_features, out_features
    L = largest_divisor(K, lanes)
    R = largest_divisor(N, rows)
    KB, NB = K // L, N // R
    # Functions differ only by the bias; TVMScript needs both signatures spelled out.
    if has_bias:

        @T.prim_func(private=True, s_tir=True)
        def linear_bias(var_x: T.handle, w: T.Buffer((N, K), "float16"),
                        b: T.Buffer((N,), "float16"), var_y: T.handle):
            T.func_attr({"tir.noalias": True})
            n = T.int64()
            x = T.match_buffer(var_x, (1, n, K), "float32")
            y = T.match_buffer(var_y, (1, n, N), "float32")
            with T.sblock("root"):
                for ib in T.parallel(NB):
                    acc = T.alloc_buffer((R, L), "float32", scope="local")
                    if n == T.int64(1):
                        for r in T.unroll(R):
                            for l in T.vectorized(L):
                                acc[r, l] = T.float32(0)
                        for kb in range(KB):
                            for r in T.unroll(R):
                                for l in T.vectorized(L):
                                    acc[r, l] = acc[r, l] + x[0, 0, kb * L + l] * T.Cast(
                                        "float32", w[ib * R + r, kb * L + l])
                        for r in T.unroll(R):
                            y[0, 0, ib * R + r] = T.Cast("float32", b[ib * R + r])
                            for l in range(L):
                                y[0, 0, ib * R + r] = y[0, 0, ib * R + r] + acc[r, l]
                    else:
                        wblk = T.alloc_buffer((R, K), "float32", scope="local")
                        for r in range(R):
                            for kb in range(KB):
                                for l in T.vectorized(L):
                                    wblk[r, kb * L + l] = T.Cast("float32", w[ib * R + r, kb * L + l])
                        for t in range(n):
                            for r in T.unroll(R):
                                for l in T.vectorized(L):
                                    acc[r, l] = T.float32(0)
                            for kb in range(KB):
                                for r in T.unroll(R):
                                    for l in T.vectorized(L):
                                        acc[r, l] = acc[r, l] + x[0, t, kb * L + l] * wblk[r, kb * L + l]
                            for r in T.unroll(R):
                                y[0, t, ib * R + r] = T.Cast("float32", b[ib * R + r])
                                for l in range(L):
                                    y[0, t, ib * R + r] = y[0, t, ib * R + r] + acc[r, l]

        return linear_bias

    @T.prim_func(private=True, s_tir=True)
    def linear(var_x: T.handle, w: T.Buffer((N, K), "float16"), var_y: T.handle):
        T.func_attr({"tir.noalias": True})
        n = T.int64()
        x = T.match_buffer(var_x, (1, n, K), "float32")
        y = T.match_buffer(var_y, (1, n, N), "float32")
        with T.sblock("root"):
            for ib in T.parallel(NB):
                acc = T.alloc_buffer((R, L), "float32", scope="local")
                if n == T.int64(1):
                    for r in T.unroll(R):
                        for l in T.vectorized(L):
                            acc[r, l] = T.float32(0)
                    for kb in range(KB):
                        for r in T.unroll(R):
                            for l in T.vectorized(L):
                                acc[r, l] = acc[r, l] + x[0, 0, kb * L + l] * T.Cast(
                                    "float32", w[ib * R + r, kb * L + l])
                    for r in T.unroll(R):
                        y[0, 0, ib * R + r] = T.float32(0)
                        for l in range(L):
                            y[0, 0, ib * R + r] = y[0, 0, ib * R + r] + acc[r, l]
                else:
                    wblk = T.alloc_buffer((R, K), "float32", scope="local")
                    for r in range(R):
                        for kb in range(KB):
                            for l in T.vectorized(L):
                                wblk[r, kb * L + l] = T.Cast("float32", w[ib * R + r, kb * L + l])
                    for t in range(n):
                        for r in T.unroll(R):
                            for l in T.vectorized(L):
                                acc[r, l] = T.float32(0)
                        for kb in range(KB):
                            for r in T.unroll(R):
                                for l in T.vectorized(L):
                                    acc[r, l] = acc[r, l] + x[0, t, kb * L + l] * wblk[r, kb * L + l]
                        for r in T.unroll(R):
                            y[0, t, ib * R + r] = T.float32(0)
                            for l in range(L):
                                y[0, t, ib * R + r] = y[0, t, ib * R + r] + acc[r, l]

    return linear
