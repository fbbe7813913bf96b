"""Neuron-cluster FFN kernels in TIR: sparse (over a symbolic list of active clusters) and dense.

Generated per (FFN kind, d_model, d_ff, cluster size C, weight dtype, threads) over the bundled
neuron layout of :mod:`xpuc.runtime.formats.bundle`. For each active cluster ``c = idx[j]`` and each
of its ``C`` neurons ``i`` the kernel computes the gate dot product, skips the neuron when its
activation is zero (below the threshold for ``swiglu``), otherwise computes the up dot product and
adds ``h * down_column`` into a per-thread partial sum; the partial sums are reduced at the end.

Modes (``mode=``):

* ``"fused"``: one kernel ``(x, idx, thr, *weights, y)``.
* ``"gate"`` + ``"updown"``: the paper's two steps. ``gate`` computes the gate pre-activations of the
  active clusters (the real activation mask) into ``g[k, C]``; ``updown`` reads ``g`` and touches the
  up/down rows of firing neurons only — the split that lets a flash reader fetch up/down records only
  for neurons whose gate fired.
* ``"dense"``: every cluster, no skipping: ``(x, thr, *weights, y)``; the baseline and the oracle.

Schedule: ``threads`` parallel tasks each own a contiguous share of the active clusters and a
private partial output; dot products and AXPYs run 16 fp32 lanes wide over blocks of 32 weights
(int4 blocks are unpacked from nibbles in registers, low nibbles then high nibbles). A dot product keeps
four independent accumulator chains (two blocks x two halves), so its FMAs overlap instead of waiting on
each other; a cluster's firing neurons are collected first and their down rows added four at a time (one
read-modify-write of the partial output per four neurons); where rows are short, the record
``PREFETCH_AHEAD`` neurons ahead (in the next active cluster at a cluster's end) is prefetched.
Measured on the SmolLM2 FFN (576 x 1536, q4_0, clusters of 32, every cluster active, 30 layers' records
streamed from memory, 2 threads): 96 us per layer against 160-170 us with one chain, per-neuron AXPYs and no
prefetch. LLVM maps the 16-lane vectors onto AVX-512/AVX2 on x86 and onto four 128-bit NEON registers on
ARM. With ``int8`` (an ISA) the gate and up dot products run over int8 activations (:mod:`xpuc.schedules.int8_dot`).
"""

from __future__ import annotations

from functools import cache

from tvm import tirx
from tvm.script import tirx as T

from xpuc.runtime.formats.bundle import QBLOCK, BundleLayout
from xpuc.schedules.int8_dot import int8_dot_available, int8_dot_isa, int8_dot_macros

__all__ = ["MODES", "int8_dot_available", "int8_dot_isa", "sparse_ffn_kernel"]

MODES = ("fused", "gate", "updown", "dense")
LANES = 16
CHAINS = 4  # independent accumulators of a dot product
DOWN_GROUP = 4  # firing neurons whose down rows share one pass over the partial output
PREFETCH_AHEAD = 2  # neuron records
# Records are prefetched only when their rows are short: the hardware prefetcher does not ramp up within a
# short row (SmolLM2's 576-wide q4_1 rows are 360 B), while long rows stream by themselves and prefetching a
# whole record fetches up/down rows the neuron may skip (7B-shaped q4_0 rows of 2304 B: 20 vs 17 GB/s without)
PREFETCH_MAX_ROW_BYTES = 1024


def _prefetch_record(w, c, i, rows: int, row: int, itemsize: int) -> None:
    """Emit prefetches of neuron ``i``'s record in cluster ``c`` (``rows`` x ``row`` elements, one per line)."""
    for t in range((rows * row * itemsize + 63) // 64):
        e = t * 64 // itemsize
        T.evaluate(T.call_llvm_intrin("void", "llvm.prefetch.p0", T.address_of(w[c, i, e // row, e % row]),
                                      T.int32(0), T.int32(3), T.int32(1)))


def _element_getter(layout: BundleLayout):
    """Python-level builder of the fp32 weight value at (cluster c, neuron i, row r, block b, half, lane l)."""
    if layout.dtype in ("float32", "float16"):

        def elem(w, c, i, r, b, half, l):
            return T.Cast("float32", w[c, i, r, b * QBLOCK + half * 16 + l])

        return elem
    bb = layout.block_bytes

    def half_float(w, c, i, r, at):
        bits = T.Cast("uint16", w[c, i, r, at]) | T.shift_left(T.Cast("uint16", w[c, i, r, at + 1]), T.uint16(8))
        return T.Cast("float32", T.reinterpret("float16", bits))

    def nibble(w, c, i, r, b, half, l):
        byte = w[c, i, r, b * bb + (bb - 16) + l]
        return T.Cast("float32", T.shift_right(byte, T.Cast("uint8", half * 4)) & T.uint8(15))

    if layout.dtype == "q4_0":

        def elem(w, c, i, r, b, half, l):
            return (nibble(w, c, i, r, b, half, l) - T.float32(8)) * half_float(w, c, i, r, b * bb)

        return elem

    def elem(w, c, i, r, b, half, l):
        return (nibble(w, c, i, r, b, half, l) * half_float(w, c, i, r, b * bb)
                + half_float(w, c, i, r, b * bb + 2))

    return elem


def _activation_exprs(kind: str):
    """(fires(g, thr) -> bool, combine(g, u, thr) -> h) for an FFN kind.

    ``combine`` applies the whole activation, so it is exact whether or not ``fires`` was checked
    (the dense kernels do not check); ``fires`` is the cheap test that lets sparse kernels skip the
    up row and the down AXPY. For ``relu`` (not gated) ``g`` is the up projection.
    """

    def silu(g):
        return g * T.sigmoid(g)

    zero = T.float32(0)
    if kind == "swiglu":
        return ((lambda g, thr: T.fabs(silu(g)) > thr),
                (lambda g, u, thr: T.Select(T.fabs(silu(g)) > thr, silu(g), zero) * u))
    if kind == "drelu":
        return (lambda g, thr: g > zero), (lambda g, u, thr: T.max(g, zero) * T.max(u, zero))
    if kind == "reglu":
        return (lambda g, thr: g > zero), (lambda g, u, thr: T.max(g, zero) * u)
    return (lambda g, thr: g > zero), (lambda g, u, thr: T.max(g, zero))


@cache
def sparse_ffn_kernel(layout: BundleLayout, mode: str = "fused", threads: int = 2,
                      symbolic: bool = False, int8: str = "") -> tirx.PrimFunc:
    """Generate the TIR PrimFunc for ``layout`` in ``mode`` with ``threads`` parallel tasks.

    Parameters
    ----------
    layout:
        FFN kind, sizes, cluster size and weight dtype.
    mode:
        ``fused`` | ``gate`` | ``updown`` | ``dense`` (see the module docstring).
    threads:
        Number of parallel tasks (each with a private partial output of ``d_model`` floats).
    symbolic:
        The bundle's cluster count is a variable (``w`` of shape ``(n, C, R, row)``): one build serves a
        neuron cache's pool of any size (``layout.n_clusters`` is then ignored).
    int8:
        ``""`` (float32 dot products) or the instructions of the int8 dot products over activations quantized
        to int8 blocks, as llama.cpp does: ``avx512vnni`` or ``dotprod`` (:func:`int8_dot_isa`); q4_0 weights
        only. The down AXPYs stay float32.

    Returns
    -------
    func : tirx.PrimFunc
        ``fused(x, idx, thr, w, y)``, ``dense(x, thr, w, y)``, ``gate(x, idx, w, g)``,
        ``updown(x, idx, g, thr, w, y)`` with ``x, y (d,) f32``, ``idx (k,) i32`` sorted active
        clusters, ``g (k, C) f32`` gate pre-activations, ``thr (1,) f32`` (SiLU threshold; unused by
        the ReLU kinds) and ``w = layout.shape()`` the bundle.
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode '{mode}' (known: {', '.join(MODES)})")
    if mode in ("gate", "updown") and not layout.gated:
        raise ValueError("the two-step kernels need a gated FFN kind")
    if int8 and layout.dtype != "q4_0":
        raise ValueError(f"int8 dot products need q4_0 weights, not {layout.dtype}")
    D, C, R, NCL, P = layout.d_model, layout.cluster, layout.rows, layout.n_clusters, threads
    NB = D // QBLOCK
    DOWN = R - 1
    WSHAPE, WDT = _weight_shape(layout, symbolic), layout.storage_dtype
    NCL = WSHAPE[0]
    elem = _element_getter(layout)
    fires, combine = _activation_exprs(layout.kind)

    ROW = layout.row_length
    XQ, XS = (D, NB) if int8 else (1, 1)  # the int8 activations' buffers (placeholders without int8)
    ITEM = {"float32": 4, "float16": 2}.get(layout.dtype, 1)
    G = DOWN_GROUP

    @T.macro
    def dot32(xv, acc, s, w, c, i, r, out_slot):
        """s[out_slot] = x . row r of neuron i of cluster c, over CHAINS independent accumulators."""
        x = xv[0]
        for a in T.unroll(CHAINS):
            for l in T.vectorized(LANES):
                acc[a, l] = T.float32(0)
        for b2 in range(NB // 2):
            for u in T.unroll(2):
                for half in T.unroll(2):
                    for l in T.vectorized(LANES):
                        acc[u * 2 + half, l] = acc[u * 2 + half, l] + x[(b2 * 2 + u) * QBLOCK + half * 16 + l] * elem(
                            w, c, i, r, b2 * 2 + u, half, l)
        for b in range(NB - NB % 2, NB):
            for half in T.unroll(2):
                for l in T.vectorized(LANES):
                    acc[half, l] = acc[half, l] + x[b * QBLOCK + half * 16 + l] * elem(w, c, i, r, b, half, l)
        for l in T.vectorized(LANES):
            acc[0, l] = (acc[0, l] + acc[1, l]) + (acc[2, l] + acc[3, l])
        for l in T.vectorized(8):
            acc[0, l] = acc[0, l] + acc[0, l + 8]
        for l in T.vectorized(4):
            acc[0, l] = acc[0, l] + acc[0, l + 4]
        for l in T.vectorized(2):
            acc[0, l] = acc[0, l] + acc[0, l + 2]
        s[out_slot] = acc[0, 0] + acc[0, 1]

    dot8, quantize_x = int8_dot_macros(layout, int8) if int8 else (None, None)
    dot = dot8 if int8 else dot32
    quantized = bool(int8)

    @T.macro
    def prepare_x(x, xq, xs, xadj):
        if quantized:
            quantize_x(x, xq, xs, xadj)

    @T.macro
    def axpy(part, w, c, i, p, h):
        for b in range(NB):
            for half in T.unroll(2):
                for l in T.vectorized(LANES):
                    part[p, b * QBLOCK + half * 16 + l] = part[p, b * QBLOCK + half * 16 + l] + h * elem(
                        w, c, i, DOWN, b, half, l)

    @T.macro
    def up_down(x, acc, s, part, thr, w, c, i, p, always):
        """With the gate (or, for relu, the up) pre-activation in s[0]: finish the neuron."""
        if always or fires(s[0], thr[0]):
            if R == 3:
                dot(x, acc, s, w, c, i, 1, 1)
            else:
                s[1] = T.float32(0)
            s[2] = combine(s[0], s[1], thr[0])
            if always or s[2] != T.float32(0):
                axpy(part, w, c, i, p, s[2])

    @T.macro
    def collect(x, acc, s, thr, w, c, i, fi, hv, nf):
        """With the gate (relu: up) pre-activation in s[0]: if neuron i fires, its output joins the list."""
        if fires(s[0], thr[0]):
            if R == 3:
                dot(x, acc, s, w, c, i, 1, 1)
            else:
                s[1] = T.float32(0)
            s[2] = combine(s[0], s[1], thr[0])
            if s[2] != T.float32(0):
                fi[nf[0]] = i
                hv[nf[0]] = s[2]
                nf[0] = nf[0] + 1

    @T.macro
    def down_collected(part, w, c, fi, hv, nf, p):
        """part[p] += sum of h * down row over the collected neurons, G rows per pass."""
        for q in range(nf[0] // G):
            for b in range(NB):
                for half in T.unroll(2):
                    for l in T.vectorized(LANES):
                        part[p, b * QBLOCK + half * 16 + l] = (
                            part[p, b * QBLOCK + half * 16 + l]
                            + hv[q * G] * elem(w, c, fi[q * G], DOWN, b, half, l)
                            + hv[q * G + 1] * elem(w, c, fi[q * G + 1], DOWN, b, half, l)
                            + hv[q * G + 2] * elem(w, c, fi[q * G + 2], DOWN, b, half, l)
                            + hv[q * G + 3] * elem(w, c, fi[q * G + 3], DOWN, b, half, l))
        for q in range(nf[0] - nf[0] % G, nf[0]):
            axpy(part, w, c, fi[q], p, hv[q])

    def prefetch_next(w, idx, j, i, k):
        if ROW * ITEM > PREFETCH_MAX_ROW_BYTES:
            return
        _prefetch_record(w, T.if_then_else(i + PREFETCH_AHEAD < C, idx[j], idx[T.min(j + 1, k - 1)]),
                         (i + PREFETCH_AHEAD) % C, R, ROW, ITEM)

    @T.macro
    def clear_partial(part, p):
        for e in range(D // LANES):
            for l in T.vectorized(LANES):
                part[p, e * LANES + l] = T.float32(0)

    @T.macro
    def reduce_partials(part, y):
        for e in range(D // LANES):
            for l in T.vectorized(LANES):
                y[e * LANES + l] = part[0, e * LANES + l]
            for p in range(1, P):
                for l in T.vectorized(LANES):
                    y[e * LANES + l] = y[e * LANES + l] + part[p, e * LANES + l]

    @T.macro
    def firing_down(x, idx, g, thr, w, part, p, k):
        """Task ``p``'s share of the ``k`` active clusters: each neuron's gate pre-activation (from ``g``, else
        computed here with the next records prefetched), the firing neurons collected, their down rows added."""
        acc = T.alloc_buffer((CHAINS, LANES), "float32", scope="global")
        s = T.alloc_buffer((3,), "float32", scope="global")
        fi = T.alloc_buffer((C,), "int32", scope="global")
        hv = T.alloc_buffer((C,), "float32", scope="global")
        nf = T.alloc_buffer((1,), "int32", scope="global")
        clear_partial(part, p)
        for j in range(k * p // P, k * (p + 1) // P):
            nf[0] = 0
            for i in range(C):
                if g is None:
                    prefetch_next(w, idx, j, i, k)
                    dot(x, acc, s, w, idx[j], i, 0, 0)
                else:
                    s[0] = g[j, i]
                collect(x, acc, s, thr, w, idx[j], i, fi, hv, nf)
            down_collected(part, w, idx[j], fi, hv, nf, p)

    if mode == "dense":

        @T.prim_func(private=True, s_tir=True)
        def dense(x: T.Buffer((D,), "float32"), thr: T.Buffer((1,), "float32"), w: T.Buffer(WSHAPE, WDT),
                  y: T.Buffer((D,), "float32")):
            T.func_attr({"tir.noalias": True, "tirx.is_scheduled": True})
            with T.sblock("root"):
                xq = T.alloc_buffer((XQ,), "int8", scope="global")
                xs = T.alloc_buffer((XS,), "float32", scope="global")
                xadj = T.alloc_buffer((XS * 8,), "int32", scope="global")
                prepare_x(x, xq, xs, xadj)
                part = T.alloc_buffer((P, D), "float32", scope="global")
                for p in T.parallel(P):
                    acc = T.alloc_buffer((CHAINS, LANES), "float32", scope="global")
                    s = T.alloc_buffer((3,), "float32", scope="global")
                    clear_partial(part, p)
                    for c in range(NCL * p // P, NCL * (p + 1) // P):
                        for i in range(C):
                            dot((x, xq, xs, xadj), acc, s, w, c, i, 0, 0)
                            up_down((x, xq, xs, xadj), acc, s, part, thr, w, c, i, p, True)
                reduce_partials(part, y)

        return dense

    if mode == "fused":

        @T.prim_func(private=True, s_tir=True)
        def fused(x: T.Buffer((D,), "float32"), var_idx: T.handle, thr: T.Buffer((1,), "float32"),
                  w: T.Buffer(WSHAPE, WDT), y: T.Buffer((D,), "float32")):
            T.func_attr({"tir.noalias": True, "tirx.is_scheduled": True})
            k = T.int32()
            idx = T.match_buffer(var_idx, (k,), "int32")
            with T.sblock("root"):
                xq = T.alloc_buffer((XQ,), "int8", scope="global")
                xs = T.alloc_buffer((XS,), "float32", scope="global")
                xadj = T.alloc_buffer((XS * 8,), "int32", scope="global")
                prepare_x(x, xq, xs, xadj)
                part = T.alloc_buffer((P, D), "float32", scope="global")
                for p in T.parallel(P):
                    firing_down((x, xq, xs, xadj), idx, None, thr, w, part, p, k)
                reduce_partials(part, y)

        return fused

    if mode == "gate":

        @T.prim_func(private=True, s_tir=True)
        def gate(x: T.Buffer((D,), "float32"), var_idx: T.handle, w: T.Buffer(WSHAPE, WDT), var_g: T.handle):
            T.func_attr({"tir.noalias": True, "tirx.is_scheduled": True})
            k = T.int32()
            idx = T.match_buffer(var_idx, (k,), "int32")
            g = T.match_buffer(var_g, (k, C), "float32")
            with T.sblock("root"):
                xq = T.alloc_buffer((XQ,), "int8", scope="global")
                xs = T.alloc_buffer((XS,), "float32", scope="global")
                xadj = T.alloc_buffer((XS * 8,), "int32", scope="global")
                prepare_x(x, xq, xs, xadj)
                for p in T.parallel(P):
                    acc = T.alloc_buffer((CHAINS, LANES), "float32", scope="global")
                    s = T.alloc_buffer((3,), "float32", scope="global")
                    for j in range(k * p // P, k * (p + 1) // P):
                        for i in range(C):
                            dot((x, xq, xs, xadj), acc, s, w, idx[j], i, 0, 0)
                            g[j, i] = s[0]

        return gate

    @T.prim_func(private=True, s_tir=True)
    def updown(x: T.Buffer((D,), "float32"), var_idx: T.handle, var_g: T.handle, thr: T.Buffer((1,), "float32"),
               w: T.Buffer(WSHAPE, WDT), y: T.Buffer((D,), "float32")):
        T.func_attr({"tir.noalias": True, "tirx.is_scheduled": True})
        k = T.int32()
        idx = T.match_buffer(var_idx, (k,), "int32")
        g = T.match_buffer(var_g, (k, C), "float32")
        with T.sblock("root"):
            xq = T.alloc_buffer((XQ,), "int8", scope="global")
            xs = T.alloc_buffer((XS,), "float32", scope="global")
            xadj = T.alloc_buffer((XS * 8,), "int32", scope="global")
            prepare_x(x, xq, xs, xadj)
            part = T.alloc_buffer((P, D), "float32", scope="global")
            for p in T.parallel(P):
                firing_down((x, xq, xs, xadj), idx, g, thr, w, part, p, k)
            reduce_partials(part, y)

    return updown


def _weight_shape(layout: BundleLayout, symbolic: bool) -> tuple:
    """The bundle's buffer shape; with ``symbolic`` its cluster count is a TIR variable."""
    shape = layout.shape()
    # int64: a pool over all layers of a 7B model passes 2 GiB, whose byte offsets overflow int32
    return (tirx.Var("n_slots", "int64"), *shape[1:]) if symbolic else shape
