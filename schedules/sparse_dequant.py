"""The records' dequantizer: a bundle of neuron records as float32 (the offloading runtime's dense prefill)."""

from __future__ import annotations

from functools import cache

from tvm import tirx
from tvm.script import tirx as T

from xpuc.runtime.formats.bundle import QBLOCK, BundleLayout
from xpuc.schedules.sparse_ffn import LANES, _element_getter, _weight_shape


@cache
def dequantize_kernel(layout: BundleLayout, threads: int = 2, symbolic: bool = False) -> tirx.PrimFunc:
    """``dequant(w, out)``: the bundle ``w`` (``layout.shape()``) as float32 ``out`` (NCL, C, R, d).

    The dense prefill of the offloading runtime dequantizes a chunk of records with it, then multiplies the
    whole prompt by the float32 weights (numpy/BLAS). Same element decoding as the sparse kernels; clusters in
    parallel, 16 lanes vectorized.
    """
    D, C, R = layout.d_model, layout.cluster, layout.rows
    NB = D // QBLOCK
    WSHAPE, WDT = _weight_shape(layout, symbolic), layout.storage_dtype
    NCL = WSHAPE[0]
    elem = _element_getter(layout)

    @T.prim_func(private=True, s_tir=True)
    def dequant(w: T.Buffer(WSHAPE, WDT), out: T.Buffer((NCL, C, R, D), "float32")):
        T.func_attr({"tir.noalias": True, "tirx.is_scheduled": True})
        for c in T.parallel(NCL):
            for i, r, b in T.grid(C, R, NB):
                for half in T.unroll(2):
                    for lane in T.vectorized(LANES):
                        out[c, i, r, b * QBLOCK + half * 16 + lane] = elem(w, c, i, r, b, half, lane)

    return dequant
