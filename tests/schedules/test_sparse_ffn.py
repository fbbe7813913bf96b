"""Sparse neuron-cluster FFN kernels on the host: every kind x dtype, several C and k, against numpy."""

from __future__ import annotations

import numpy as np
import pytest

from xpuc.runtime.errors import XpucError
from xpuc.runtime.formats.bundle import (
    FFN_KINDS,
    WEIGHT_DTYPES,
    BundleLayout,
    bundle_ffn,
    dequantize_q4,
    quantize_q4,
    sparse_ffn_reference,
)
from xpuc.schedules.sparse_ffn_host import SparseFFNKernel

D, F = 64, 192


def _weights(seed: int, d: int = D, f: int = F):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((f, d)).astype(np.float32), rng.standard_normal((f, d)).astype(np.float32),
            rng.standard_normal((d, f)).astype(np.float32) * 0.1)


def _kernel(kind: str, dtype: str, cluster: int, threshold: float = 0.0, seed: int = 0) -> SparseFFNKernel:
    gate, up, down = _weights(seed)
    layout = BundleLayout(kind, D, F, cluster, dtype)
    return SparseFFNKernel(layout, bundle_ffn(layout, up, down, gate), threads=2, threshold=threshold)


@pytest.mark.parametrize("kind", FFN_KINDS)
@pytest.mark.parametrize("dtype", WEIGHT_DTYPES)
def test_every_kind_and_dtype(kind, dtype):
    rng = np.random.default_rng(1)
    for cluster in (4, 16):
        k = _kernel(kind, dtype, cluster, threshold=0.1)
        x = rng.standard_normal(D).astype(np.float32)
        for n_active in (0, 1, 5, k.layout.n_clusters):
            idx = np.sort(rng.choice(k.layout.n_clusters, n_active, replace=False)).astype(np.int32)
            want = sparse_ffn_reference(k.layout, k.bundle, x, idx, 0.1)
            np.testing.assert_allclose(k(x, idx), want, rtol=1e-4, atol=1e-4 * max(1.0, np.abs(want).max()))
        want = sparse_ffn_reference(k.layout, k.bundle, x, None, 0.1)
        np.testing.assert_allclose(k.dense(x), want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


@pytest.mark.parametrize("kind", ["reglu", "swiglu", "drelu"])
def test_two_step_equals_fused(kind):
    k = _kernel(kind, "float16", 8, threshold=0.2)
    rng = np.random.default_rng(2)
    x = rng.standard_normal(D).astype(np.float32)
    idx = np.sort(rng.choice(k.layout.n_clusters, 9, replace=False)).astype(np.int32)
    g = k.gate(x, idx)
    w = k.bundle.astype(np.float32)[idx]
    np.testing.assert_allclose(g, np.einsum("ncd,d->nc", w[:, :, 0], x), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(k.updown(x, idx, g), k(x, idx), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", FFN_KINDS)
@pytest.mark.parametrize("dtype", ["float32", "q4_0"])
def test_oracle_mask_equals_dense(kind, dtype):
    """With the true active clusters the sparse kernel computes exactly the dense FFN."""
    k = _kernel(kind, dtype, 4, threshold=0.3, seed=3)
    rng = np.random.default_rng(4)
    for _ in range(3):
        x = rng.standard_normal(D).astype(np.float32)
        idx = k.active_clusters(x)
        np.testing.assert_allclose(k(x, idx), k.dense(x), rtol=1e-4, atol=1e-5)


def test_sparsity_skips_clusters():
    """Clusters left out change the result (the kernel really restricts itself to idx)."""
    k = _kernel("reglu", "float32", 4)
    x = np.random.default_rng(5).standard_normal(D).astype(np.float32)
    all_idx = np.arange(k.layout.n_clusters, dtype=np.int32)
    assert not np.allclose(k(x, all_idx[::2]), k(x, all_idx))


def test_q4_roundtrip_matches_ggml_block_layout():
    rng = np.random.default_rng(6)
    rows = rng.standard_normal((3, 64)).astype(np.float32)
    for with_min, nbytes in ((False, 18), (True, 20)):
        q = quantize_q4(rows, with_min)
        assert q.shape == (3, 2 * nbytes) and q.dtype == np.uint8
        back = dequantize_q4(q, with_min)
        assert np.abs(back - rows).max() < 0.35
    import gguf  # byte-identical to GGML's block_q4_0 / block_q4_1: gguf dequantizes them the same

    for name, with_min in (("Q4_0", False), ("Q4_1", True)):
        q = quantize_q4(rows, with_min)
        ref = gguf.quants.dequantize(q, gguf.GGMLQuantizationType[name])
        np.testing.assert_allclose(dequantize_q4(q, with_min), ref, rtol=1e-6, atol=1e-6)


# ---- bad input ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_kernel():
    return _kernel("reglu", "float32", 8)


@pytest.mark.parametrize("idx,msg", [
    (np.array([0, 99], np.int32), "out of range"),
    (np.array([-1, 2], np.int32), "out of range"),
    (np.array([3, 1], np.int32), "sorted"),
    (np.array([2, 2], np.int32), "duplicate"),
    (np.array([1, 2], np.int64), "int32"),
    (np.array([[1, 2]], np.int32), "1-D"),
])
def test_bad_cluster_ids(small_kernel, idx, msg):
    x = np.zeros(D, np.float32)
    with pytest.raises(XpucError, match=msg):
        small_kernel(x, idx)


@pytest.mark.parametrize("x", [np.zeros(D, np.float64), np.zeros(D + 1, np.float32), [0.0] * D])
def test_bad_activation_input(small_kernel, x):
    with pytest.raises(XpucError, match="float32 array of shape"):
        small_kernel(x, np.array([0], np.int32))


def test_bad_bundle_and_layout():
    with pytest.raises(ValueError, match="multiple of the cluster size"):
        BundleLayout("reglu", 64, 100, 8, "float16")
    with pytest.raises(ValueError, match="unknown FFN kind"):
        BundleLayout("gelu", 64, 128, 8, "float16")
    layout = BundleLayout("reglu", 64, 128, 8, "float16")
    with pytest.raises(XpucError, match="bundle has shape"):
        SparseFFNKernel(layout, np.zeros((1, 2, 3), np.float16))


@pytest.mark.parametrize("dtype", ["float16", "q4_0", "q4_1"])
def test_compiled_dequantizer_equals_numpy(dtype):
    """The dense prefill's compiled dequantization against the numpy decoding of the same records."""
    from xpuc.runtime.flash_reader import aligned_empty
    from xpuc.runtime.formats.bundle import BundleLayout, bundle_ffn, dequantize_bundle
    from xpuc.schedules.sparse_ffn_host import BundleDequantizer

    layout = BundleLayout("swiglu", 64, 96, 8, dtype)
    rng = np.random.default_rng(4)
    up, gate = rng.standard_normal((96, 64)).astype(np.float32), rng.standard_normal((96, 64)).astype(np.float32)
    down = rng.standard_normal((64, 96)).astype(np.float32)
    records = aligned_empty(layout.shape(), layout.storage_dtype)
    records[...] = bundle_ffn(layout, up, down, gate)
    got = BundleDequantizer(layout)(records)
    np.testing.assert_array_equal(got, dequantize_bundle(layout, records))
    with pytest.raises(XpucError, match="expected"):
        BundleDequantizer(layout)(records[:-1])


def test_a_pool_past_2_gib_is_indexed_in_64_bits():
    """The runtime's kernels index one pool of every layer's slots (symbolic slot count); a 7B model's pool
    passes 2 GiB, so byte offsets must not wrap in 32 bits. Records placed past 2 GiB of an otherwise untouched
    (unallocated) mapping give numpy's result."""
    import tvm

    from xpuc.runtime.flash_reader import aligned_empty
    from xpuc.schedules.sparse_ffn import sparse_ffn_kernel
    from xpuc.targets.profile import load_profile

    layout = BundleLayout("drelu", D, F, 4, "q4_0")
    gate, up, down = _weights(3)
    bundle = bundle_ffn(layout, up, down, gate)
    n = 2**31 // bundle[0].nbytes + 2 * bundle.shape[0]
    pool = aligned_empty((n, *bundle.shape[1:]), bundle.dtype)
    base = n - bundle.shape[0]
    pool[base:] = bundle
    f = sparse_ffn_kernel(layout, "fused", 2, symbolic=True).with_attr("global_symbol", "fused")
    lib = tvm.compile(tvm.IRModule({"fused": f}), target=load_profile("host").cpu_target())
    rng = np.random.default_rng(4)
    x = rng.standard_normal(D).astype(np.float32)
    idx = np.sort(rng.choice(bundle.shape[0], 20, replace=False)).astype(np.int32)
    y = tvm.runtime.tensor(np.zeros(D, np.float32))
    lib["fused"](tvm.runtime.tensor(x), tvm.runtime.tensor(idx + np.int32(base)),
                 tvm.runtime.tensor(np.zeros(1, np.float32)), tvm.runtime.from_dlpack(pool), y)
    want = sparse_ffn_reference(layout, bundle, x, idx, 0.0)
    np.testing.assert_allclose(y.numpy(), want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
