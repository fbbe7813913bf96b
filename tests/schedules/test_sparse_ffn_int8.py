"""Neuron-cluster kernels with int8 dot products (activations in int8 blocks, ``vpdpbusd``) against numpy."""

from __future__ import annotations

import numpy as np
import pytest

from xpuc.runtime.errors import XpucError
from xpuc.runtime.formats.bundle import FFN_KINDS, BundleLayout, bundle_ffn, int8_activations, sparse_ffn_reference
from xpuc.schedules.sparse_ffn import int8_dot_available, int8_dot_isa, sparse_ffn_kernel
from xpuc.schedules.sparse_ffn_host import SparseFFNKernel
from xpuc.targets.profile import load_profile

HOST = load_profile("host").cpu_target()
needs_vnni = pytest.mark.skipif(not int8_dot_available(HOST), reason="this CPU has no AVX-512 VNNI")


def _kernel(kind: str, d: int, f: int, cluster: int, threshold: float, int8: bool, seed: int = 0):
    rng = np.random.default_rng(seed)
    gate, up = (rng.standard_normal((f, d)).astype(np.float32) for _ in range(2))
    down = rng.standard_normal((d, f)).astype(np.float32) * 0.1
    layout = BundleLayout(kind, d, f, cluster, "q4_0")
    return SparseFFNKernel(layout, bundle_ffn(layout, up, down, gate), threads=2, threshold=threshold, int8=int8)


def test_int8_activations_round_half_away_from_zero_per_block():
    x = np.zeros(64, np.float32)
    x[0], x[1], x[2] = 127.0, 0.5, -0.5  # scale 1: 0.5 -> 1, -0.5 -> -1
    x[32:] = np.linspace(-2, 2, 32, dtype=np.float32)  # its own scale, 2/127
    got = int8_activations(x)
    assert got[:3].tolist() == [127.0, 1.0, -1.0] and not got[3:32].any()
    np.testing.assert_allclose(got[32:], x[32:], atol=1 / 127 + 1e-6)
    assert not int8_activations(np.zeros(32, np.float32)).any()  # an all-zero block stays zero (no 0/0)


@needs_vnni
@pytest.mark.parametrize("kind", FFN_KINDS)
@pytest.mark.parametrize("d", [64, 96])  # an even and an odd number of blocks per row
def test_int8_kernels_equal_numpy_on_int8_activations(kind, d):
    rng = np.random.default_rng(1)
    for cluster in (4, 16):
        k = _kernel(kind, d, 192, cluster, 0.1, int8=True)
        x = rng.standard_normal(d).astype(np.float32)
        scale = np.abs(sparse_ffn_reference(k.layout, k.bundle, x, None, 0.1, int8=True)).max()
        for n_active in (0, 1, 5, k.layout.n_clusters):
            idx = np.sort(rng.choice(k.layout.n_clusters, n_active, replace=False)).astype(np.int32)
            want = sparse_ffn_reference(k.layout, k.bundle, x, idx, 0.1, int8=True)
            np.testing.assert_allclose(k(x, idx), want, rtol=1e-4, atol=1e-4 * scale)
        np.testing.assert_allclose(k.dense(x), sparse_ffn_reference(k.layout, k.bundle, x, None, 0.1, int8=True),
                                   rtol=1e-4, atol=1e-4 * scale)
        all_idx = np.arange(k.layout.n_clusters, dtype=np.int32)
        np.testing.assert_allclose(k(x, all_idx), k.dense(x), rtol=1e-5, atol=1e-5 * scale)  # oracle mask = dense
        if k.layout.gated:
            g = k.gate(x, all_idx)
            np.testing.assert_allclose(k.updown(x, all_idx, g), k(x, all_idx), rtol=1e-5, atol=1e-5 * scale)


@needs_vnni
def test_int8_differs_from_float32_by_the_activation_rounding_only():
    rng = np.random.default_rng(3)
    x = rng.standard_normal(256).astype(np.float32)
    a, b = (_kernel("reglu", 256, 256, 8, 0.0, int8=i) for i in (True, False))
    idx = np.arange(a.layout.n_clusters, dtype=np.int32)
    ya, yb = a(x, idx), b(x, idx)
    assert not np.allclose(ya, yb, rtol=1e-6, atol=0)  # the int8 path really ran
    assert np.abs(ya - yb).max() < 0.03 * np.abs(yb).max()


def test_int8_needs_q4_0_and_the_instructions():
    import tvm

    with pytest.raises(ValueError, match="q4_0"):
        sparse_ffn_kernel(BundleLayout("reglu", 64, 64, 4, "q4_1"), "fused", 2, int8="avx512vnni")
    from xpuc.compiler.offload_build import sparse_dot

    layout = BundleLayout("drelu", 64, 64, 1, "q4_0")
    phone = load_profile("oneplus-12").cpu_target()
    assert int8_dot_isa(phone) == "dotprod" and sparse_dot(layout, phone, "auto") == "int8"
    plain = tvm.target.Target({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]})
    old_x86 = tvm.target.Target({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "haswell"})
    for target in (plain, old_x86):
        assert int8_dot_isa(target) == "" and sparse_dot(layout, target, "auto") == "float32"
        with pytest.raises(XpucError, match="int8 dot products"):
            sparse_dot(layout, target, "int8")
    assert sparse_dot(BundleLayout("drelu", 64, 64, 1, "q4_1"), phone, "auto") == "float32"
    assert sparse_dot(layout, phone, "float32") == "float32"
