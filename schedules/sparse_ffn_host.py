"""SparseFFNKernel: compiled neuron-cluster FFN kernels with their bundled weights, callable from Python.

Inputs are validated here (vectorized numpy checks, O(k)) so that the TIR kernels, which index weights
by the active-cluster ids they are given, never see an out-of-range, unsorted or duplicated id.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from xpuc.runtime.errors import XpucError
from xpuc.runtime.flash_reader import aligned_empty
from xpuc.runtime.formats.bundle import BundleLayout, activation, dequantize_bundle
from xpuc.targets.profile import load_profile


@dataclass
class SparseFFNKernel:
    """Compiled kernels for one FFN layer.

    Parameters
    ----------
    layout:
        FFN kind, sizes, cluster size, weight dtype.
    bundle:
        The bundled weights (``layout.shape()``, ``layout.storage_dtype``).
    target:
        TVM target to compile for (default: the host CPU profile).
    threads:
        Parallel tasks in each kernel.
    share:
        Run on ``bundle`` in place instead of a copy (it must be 64-byte aligned, e.g. from
        :func:`xpuc.runtime.flash_reader.aligned_empty`): a neuron cache fills it and the kernels see it.
    threshold:
        Activation threshold of the ``swiglu`` kind (CATS/TEAL-style); ignored by the ReLU kinds.
    int8:
        Gate and up dot products over int8-quantized activations (q4_0 weights, a target with int8 dot
        products: :func:`xpuc.schedules.sparse_ffn.int8_dot_isa`).
    """

    layout: BundleLayout
    bundle: np.ndarray
    target: object = None
    threads: int = 2
    threshold: float = 0.0
    share: bool = False  # use ``bundle``'s memory in place (page-aligned array; later writes are seen)
    int8: bool = False

    def __post_init__(self) -> None:
        import tvm

        from xpuc.schedules.sparse_ffn import int8_dot_isa, sparse_ffn_kernel

        if tuple(self.bundle.shape) != self.layout.shape() or str(self.bundle.dtype) != self.layout.storage_dtype:
            raise XpucError(f"bundle has shape {self.bundle.shape} {self.bundle.dtype}, expected "
                            f"{self.layout.shape()} {self.layout.storage_dtype}")
        target = self.target or load_profile("host").cpu_target()
        modes = ["fused", "dense"] + (["gate", "updown"] if self.layout.gated else [])
        isa = int8_dot_isa(target) if self.int8 else ""
        if self.int8 and not isa:
            raise XpucError(f"int8 dot products: target {target} has no int8 dot-product instructions")
        funcs = {m: sparse_ffn_kernel(self.layout, m, self.threads, int8=isa).with_attr("global_symbol", m)
                 for m in modes}
        self.module = tvm.compile(tvm.IRModule(funcs), target=target)
        self._dev = tvm.cpu()
        self._w = tvm.runtime.from_dlpack(self.bundle) if self.share else tvm.runtime.tensor(self.bundle, self._dev)
        self._thr = tvm.runtime.tensor(np.array([self.threshold], np.float32), self._dev)
        self._y = tvm.runtime.tensor(np.zeros(self.layout.d_model, np.float32), self._dev)
        # per-call conversions cost ~30 us each; the hot path writes into buffers shared with the kernels
        self._fns = {m: self.module[m] for m in modes}
        self._x_np = aligned_empty((self.layout.d_model,), "float32")
        self._xt = tvm.runtime.from_dlpack(self._x_np)
        self._idx_np = aligned_empty((self.layout.n_clusters,), "int32")
        self._thr_np = np.from_dlpack(self._thr)
        self._y_np = np.from_dlpack(self._y)

    def set_threshold(self, value: float) -> None:
        """Activation threshold used by the following calls (``swiglu`` kind)."""
        self._thr_np[0] = value

    def _load(self, x: np.ndarray, idx: np.ndarray | None):
        """Copy ``x`` (and the cluster ids) into the kernels' input buffers; returns the ids' tensor view."""
        import tvm

        np.copyto(self._x_np, x)
        if idx is None:
            return None
        self._idx_np[:idx.size] = idx
        return tvm.runtime.from_dlpack(self._idx_np[:idx.size])

    # --- validation -----------------------------------------------------------------------------------
    def _check_x(self, x: np.ndarray) -> np.ndarray:
        if not isinstance(x, np.ndarray) or x.dtype != np.float32 or x.shape != (self.layout.d_model,):
            got = f"{getattr(x, 'shape', '?')} {getattr(x, 'dtype', type(x).__name__)}"
            raise XpucError(f"x must be a float32 array of shape ({self.layout.d_model},), got {got}")
        return x

    def check_clusters(self, idx: np.ndarray) -> np.ndarray:
        """Validate active-cluster ids: int32, 1-D, strictly increasing, within [0, n_clusters)."""
        if not isinstance(idx, np.ndarray) or idx.dtype != np.int32 or idx.ndim != 1:
            raise XpucError(f"cluster ids must be a 1-D int32 array, got "
                            f"{getattr(idx, 'dtype', type(idx).__name__)} of shape {getattr(idx, 'shape', '?')}")
        if idx.size:
            if idx[0] < 0 or idx[-1] >= self.layout.n_clusters or (idx.size > 1 and np.any(np.diff(idx) <= 0)):
                if np.any(idx < 0) or np.any(idx >= self.layout.n_clusters):
                    raise XpucError(f"cluster id out of range [0, {self.layout.n_clusters}): "
                                    f"{int(idx.min())}..{int(idx.max())}")
                if np.any(np.diff(idx) == 0):
                    raise XpucError("duplicate cluster ids")
                raise XpucError("cluster ids must be sorted in increasing order")
        return idx

    # --- calls ----------------------------------------------------------------------------------------
    def __call__(self, x: np.ndarray, clusters: np.ndarray) -> np.ndarray:
        """FFN output over the active ``clusters`` (one fused kernel)."""
        it = self._load(self._check_x(x), self.check_clusters(clusters))
        self._fns["fused"](self._xt, it, self._thr, self._w, self._y)
        return self._y_np.copy()

    def dense(self, x: np.ndarray) -> np.ndarray:
        """FFN output over every neuron (the dense baseline, same layout)."""
        self._load(self._check_x(x), None)
        self._fns["dense"](self._xt, self._thr, self._w, self._y)
        return self._y_np.copy()

    def gate(self, x: np.ndarray, clusters: np.ndarray) -> np.ndarray:
        """Step 1 of the two-step kernels: gate pre-activations (k, C) of the active clusters."""
        import tvm

        if not self.layout.gated:
            raise XpucError(f"FFN kind '{self.layout.kind}' has no gate")
        x, idx = self._check_x(x), self.check_clusters(clusters)
        g = tvm.runtime.tensor(np.zeros((idx.size, self.layout.cluster), np.float32), self._dev)
        self.module["gate"](tvm.runtime.tensor(x, self._dev), tvm.runtime.tensor(idx, self._dev), self._w, g)
        return g.numpy()

    def updown(self, x: np.ndarray, clusters: np.ndarray, g: np.ndarray) -> np.ndarray:
        """Step 2: up/down over neurons whose gate fired."""
        import tvm

        x, idx = self._check_x(x), self.check_clusters(clusters)
        if not isinstance(g, np.ndarray) or g.dtype != np.float32 or g.shape != (idx.size, self.layout.cluster):
            raise XpucError(f"gate values must be float32 of shape ({idx.size}, {self.layout.cluster})")
        self.module["updown"](tvm.runtime.tensor(x, self._dev), tvm.runtime.tensor(idx, self._dev),
                              tvm.runtime.tensor(g, self._dev), self._thr, self._w, self._y)
        return self._y.numpy()

    def bind(self, x: np.ndarray, clusters: np.ndarray | None):
        """Validate once and return a no-argument callable running the kernel on device-resident inputs
        (``clusters=None``: the dense kernel). Used to time the kernel without per-call conversions."""
        import tvm

        xt = tvm.runtime.tensor(self._check_x(x), self._dev)
        if clusters is None:
            return lambda: self.module["dense"](xt, self._thr, self._w, self._y)
        it = tvm.runtime.tensor(self.check_clusters(clusters), self._dev)
        return lambda: self.module["fused"](xt, it, self._thr, self._w, self._y)

    def active_clusters(self, x: np.ndarray) -> np.ndarray:
        """Oracle: the clusters with at least one firing neuron for ``x`` (computed densely in numpy)."""

        w = dequantize_bundle(self.layout, self.bundle)
        g = np.einsum("ncd,d->nc", w[:, :, 0], x.astype(np.float32))
        u = np.einsum("ncd,d->nc", w[:, :, 1], x.astype(np.float32)) if self.layout.gated else None
        h = activation(self.layout.kind, g, u, self.threshold)
        return np.flatnonzero((h != 0).any(axis=1)).astype(np.int32)


class BundleDequantizer:
    """Compiled dequantization of bundled records to float32 (the dense prefill's weights).

    ``dq(records)`` decodes ``records`` (``layout.shape()`` for ``layout.n_clusters`` clusters; 64-byte
    aligned) into a float32 array (NCL, C, R, d) owned by the dequantizer, overwritten by the next call.
    """

    def __init__(self, layout: BundleLayout, target=None, threads: int = 2) -> None:
        import tvm

        from xpuc.schedules.sparse_dequant import dequantize_kernel

        self.layout = layout
        func = dequantize_kernel(layout, threads).with_attr("global_symbol", "dequant")
        self._fn = tvm.compile(tvm.IRModule({"dequant": func}),
                               target=target or load_profile("host").cpu_target())["dequant"]
        self.out = aligned_empty((layout.n_clusters, layout.cluster, layout.rows, layout.d_model), "float32")
        self._out = tvm.runtime.from_dlpack(self.out)

    def __call__(self, records: np.ndarray) -> np.ndarray:
        import tvm

        if tuple(records.shape) != self.layout.shape() or str(records.dtype) != self.layout.storage_dtype:
            raise XpucError(f"records have shape {records.shape} {records.dtype}, expected "
                            f"{self.layout.shape()} {self.layout.storage_dtype}")
        self._fn(tvm.runtime.from_dlpack(np.ascontiguousarray(records)), self._out)
        return self.out
