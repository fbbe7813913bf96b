"""aarch64 builds of the kernels: executed under QEMU user mode (linux twin) and ELF-checked (Android).

Needs qemu-user-static, gcc-aarch64-linux-gnu, libc6-dev-arm64-cross, clang, lld, llvm (installed by
``.ci/run``); skipped with the reason elsewhere, never skipped in CI.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from support.gguf_blocks import random_rows

from xpuc.runtime.formats.bundle import (
    FFN_KINDS,
    WEIGHT_DTYPES,
    BundleLayout,
    activation,
    bundle_ffn,
    int8_activations,
    sparse_ffn_reference,
)
from xpuc.schedules.int8_gemm import GEMM_FORMATS
from xpuc.schedules.lane_layout import LANE_FORMATS
from xpuc.schedules.linear import embedding_fp16, linear_fp16, pack_rows
from xpuc.schedules.linear_quant import dequantize_matrix, gate_up_act_quant, interleave_rows, linear_quant
from xpuc.schedules.sparse_ffn import sparse_ffn_kernel

pytestmark = pytest.mark.arm


def _require(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"CI must provide {missing} (.ci/run installs them)")
        pytest.skip(f"missing host tools: {missing}")


D, F, C = 64, 128, 8


@pytest.fixture(scope="module")
def emulated_results():
    """Every kind x dtype x mode, plus the dense linear and embedding kernels, in one emulated process."""
    _require("qemu-aarch64-static", "aarch64-linux-gnu-gcc")
    from support.arm_emulation import run_emulated

    rng = np.random.default_rng(0)
    funcs, cases, arrays, expected = {}, [], {}, {}
    x = rng.standard_normal(D).astype(np.float32)
    arrays["x"], arrays["thr"] = x, np.array([0.1], np.float32)
    for kind in FFN_KINDS:
        for dtype in WEIGHT_DTYPES:
            lay = BundleLayout(kind, D, F, C, dtype)
            g, u, d = (rng.standard_normal(s).astype(np.float32) for s in [(F, D), (F, D), (D, F)])
            w = bundle_ffn(lay, u, d * 0.1, g)
            tag = f"{kind}_{dtype}"
            idx = np.sort(rng.choice(lay.n_clusters, 5, replace=False)).astype(np.int32)
            arrays.update({f"w_{tag}": w, f"idx_{tag}": idx, f"yf_{tag}": np.zeros(D, np.float32),
                           f"yd_{tag}": np.zeros(D, np.float32)})
            funcs[f"fused_{tag}"] = sparse_ffn_kernel(lay, "fused")
            funcs[f"dense_{tag}"] = sparse_ffn_kernel(lay, "dense")
            cases.append({"name": tag, "func": f"fused_{tag}",
                          "args": ["x", f"idx_{tag}", "thr", f"w_{tag}", f"yf_{tag}"], "outputs": [f"yf_{tag}"]})
            cases.append({"name": tag, "func": f"dense_{tag}", "args": ["x", "thr", f"w_{tag}", f"yd_{tag}"],
                          "outputs": [f"yd_{tag}"]})
            expected[f"yf_{tag}"] = sparse_ffn_reference(lay, w, x, idx, 0.1)
            expected[f"yd_{tag}"] = sparse_ffn_reference(lay, w, x, None, 0.1)
            if lay.gated:
                arrays[f"g_{tag}"] = np.zeros((5, C), np.float32)
                arrays[f"yu_{tag}"] = np.zeros(D, np.float32)
                funcs[f"gate_{tag}"] = sparse_ffn_kernel(lay, "gate")
                funcs[f"updown_{tag}"] = sparse_ffn_kernel(lay, "updown")
                cases.append({"name": tag, "func": f"gate_{tag}", "args": ["x", f"idx_{tag}", f"w_{tag}", f"g_{tag}"],
                              "outputs": [f"g_{tag}"]})
                cases.append({"name": tag, "func": f"updown_{tag}",
                              "args": ["x", f"idx_{tag}", f"g_{tag}", "thr", f"w_{tag}", f"yu_{tag}"],
                              "outputs": [f"yu_{tag}"]})
                expected[f"yu_{tag}"] = expected[f"yf_{tag}"]
    # int8 dot products (sdot) over q4_0 records, against numpy on the int8-rounded activations
    for kind in FFN_KINDS:
        for d in (64, 96):  # an even and an odd number of blocks per row
            lay = BundleLayout(kind, d, F, C, "q4_0")
            g, u, dn = (rng.standard_normal(s).astype(np.float32) for s in [(F, d), (F, d), (d, F)])
            w, xi = bundle_ffn(lay, u, dn * 0.1, g), rng.standard_normal(d).astype(np.float32)
            tag = f"i8_{kind}_{d}"
            idx = np.sort(rng.choice(lay.n_clusters, 5, replace=False)).astype(np.int32)
            arrays.update({f"x_{tag}": xi, f"w_{tag}": w, f"idx_{tag}": idx, f"y_{tag}": np.zeros(d, np.float32)})
            funcs[f"fused_{tag}"] = sparse_ffn_kernel(lay, "fused", int8="dotprod")
            cases.append({"name": tag, "func": f"fused_{tag}",
                          "args": [f"x_{tag}", f"idx_{tag}", "thr", f"w_{tag}", f"y_{tag}"], "outputs": [f"y_{tag}"]})
            expected[f"y_{tag}"] = sparse_ffn_reference(lay, w, xi, idx, 0.1, int8=True)
    # int8 sdot over the lane layout: every format's GEMV and prefill GEMM (q6_k: float32 prefill) from the same
    # storage, the thresholded gate/up, against numpy on the int8-rounded activations
    for fmt in LANE_FORMATS:
        K, N = (512 if fmt.endswith("_k") else 96), 32
        storage = interleave_rows(random_rows(rng, fmt, N, K), fmt, K, int8=True)
        wq = dequantize_matrix(storage, fmt, int8=True)
        for n in (1, 3):
            tag = f"lane_{fmt}_{n}"
            xl = rng.standard_normal((1, n, K)).astype(np.float32)
            arrays.update({f"x_{tag}": xl, f"w_{tag}": storage, f"y_{tag}": np.zeros((1, n, N), np.float32)})
            funcs[tag] = linear_quant(K, N, fmt, 4, True, "dotprod")
            cases.append({"name": tag, "func": tag, "args": [f"x_{tag}", f"w_{tag}", f"y_{tag}"],
                          "outputs": [f"y_{tag}"]})
            rows = np.stack([int8_activations(r) for r in xl[0]]) if n == 1 or fmt in GEMM_FORMATS else xl[0]
            expected[f"y_{tag}"] = (rows @ wq.T)[None]  # int8 GEMV and GEMM (q6_k's prefill: float32)
        if fmt in ("q4_1", "q6_k"):
            tag = f"gate_up_{fmt}"
            gw = interleave_rows(random_rows(rng, fmt, 2 * N, K, scale=0.05), fmt, K, int8=True)
            gd = dequantize_matrix(gw, fmt, int8=True)
            xg = rng.standard_normal((1, 1, K)).astype(np.float32)
            xi = int8_activations(xg[0, 0])
            a = np.sort(np.abs((gd[:N] @ xi) / (1 + np.exp(-(gd[:N] @ xi)))))
            thr = np.array([a[N // 2 - 1: N // 2 + 1].mean()], np.float32)
            arrays.update({f"x_{tag}": xg, f"w_{tag}": gw, f"t_{tag}": thr,
                           f"y_{tag}": np.zeros((1, 1, N), np.float32)})
            funcs[tag] = gate_up_act_quant(K, N, fmt, "swiglu", True, "dotprod")
            cases.append({"name": tag, "func": tag, "args": [f"x_{tag}", f"w_{tag}", f"t_{tag}", f"y_{tag}"],
                          "outputs": [f"y_{tag}"]})
            expected[f"y_{tag}"] = activation("swiglu", gd[:N] @ xi, gd[N:] @ xi, float(thr[0]))[None, None]
    # dense fp16 linear (decode and prefill paths) and the embedding gather
    for K, N, bias, n in [(64, 96, False, 1), (64, 96, True, 3), (96, 40, False, 4)]:
        tag = f"lin_{K}_{N}_{int(bias)}_{n}"
        xl = rng.standard_normal((1, n, K)).astype(np.float32)
        wl = (rng.standard_normal((N, K)) * 0.1).astype(np.float16)
        bl = rng.standard_normal(N).astype(np.float16)
        arrays.update({f"x_{tag}": xl, f"w_{tag}": pack_rows(wl), f"b_{tag}": bl,
                       f"y_{tag}": np.zeros((1, n, N), np.float32)})
        funcs[tag] = linear_fp16(K, N, bias)
        cases.append({"name": tag, "func": tag,
                      "args": [f"x_{tag}", f"w_{tag}"] + ([f"b_{tag}"] if bias else []) + [f"y_{tag}"],
                      "outputs": [f"y_{tag}"]})
        expected[f"y_{tag}"] = xl @ wl.astype(np.float32).T + (bl.astype(np.float32) if bias else 0)
    table = rng.standard_normal((40, 64)).astype(np.float16)
    ids = np.array([[0, 39, 7]], np.int32)
    arrays.update({"emb_w": pack_rows(table), "emb_ids": ids, "emb_y": np.zeros((1, 3, 64), np.float32)})
    funcs["embedding"] = embedding_fp16(40, 64)
    cases.append({"name": "embedding", "func": "embedding", "args": ["emb_ids", "emb_w", "emb_y"],
                  "outputs": ["emb_y"]})
    expected["emb_y"] = table[ids[0]].astype(np.float32)[None]
    return run_emulated(funcs, cases, arrays), expected


def test_every_kernel_matches_numpy_under_qemu(emulated_results):
    got, expected = emulated_results
    assert set(expected) <= set(got)
    for key, want in expected.items():
        scale = max(1.0, float(np.abs(want).max()))
        np.testing.assert_allclose(got[key], want, rtol=1e-4, atol=1e-4 * scale, err_msg=key)


def test_android_shared_object(tmp_path):
    _require("clang", "ld.lld", "llvm-readelf", "llvm-objdump")
    from xpuc.targets.arm_build import android_target, build_library, inspect_elf
    from xpuc.targets.profile import load_profile

    profile = load_profile("oneplus-12")
    lay = BundleLayout("drelu", 4096, 14336, 32, "q4_0")
    funcs = {"ffn_fused": sparse_ffn_kernel(lay, "fused", 4), "linear": linear_fp16(576, 1536)}
    so = build_library(funcs, android_target(profile), tmp_path / "k.so")
    rep = inspect_elf(so)
    assert rep.is_aarch64, rep.machine
    assert rep.sdot == 0
    int8 = build_library({"ffn_fused": sparse_ffn_kernel(lay, "fused", 4, int8="dotprod")}, android_target(profile),
                         tmp_path / "k8.so")
    assert inspect_elf(int8).sdot >= 4  # the int8 dot products are sdot instructions, not scalar code
    lanes = build_library({"gemv": linear_quant(4864, 896, "q4_k", 4, True, "dotprod")}, android_target(profile),
                          tmp_path / "lanes.so")
    assert inspect_elf(lanes).sdot >= 32  # the lane GEMV: 4 sdot per register, 4 registers per unit, unrolled
    assert rep.glibc_versions == []
    assert "__tvm_ffi_ffn_fused" in rep.exported_ffi and "__tvm_ffi_linear" in rep.exported_ffi
    assert rep.neon_fp_ops > 50  # vectorized: NEON fmla/fmul/fadd/ld1 on v registers
    libc_like = {"memset", "memcpy", "expf", "__aeabi_memset"}
    assert all(s.startswith("TVM") or s in libc_like for s in rep.undefined), rep.undefined


@pytest.mark.parametrize("quant", [None, "q4_0"])
def test_whole_decoder_on_emulated_arm_matches_host(tmp_path, quant):
    """The same prefill+decode module built for aarch64 (linux twin) gives the host's logits under QEMU. q4_0: the
    arm64 build with int8 ``sdot`` GEMVs and GEMMs over the lane layout against the host's float32 build, within
    int8 rounding of the activations (and different from it)."""
    _require("qemu-aarch64-static", "aarch64-linux-gnu-gcc")
    import tvm
    from support.models import random_weights, spec_from, tiny_config

    from xpuc.compiler.relax_model import export_model, param_arrays
    from xpuc.runtime.session import DecoderSession
    from xpuc.targets.arm_build import linux_twin_target
    from xpuc.targets.profile import load_profile, toolchain_for
    from xpuc.targets.qemu import run_aarch64

    cfg = tiny_config("qwen2", "swiglu", tie=False, bias=True)
    spec = spec_from(cfg, random_weights(cfg, 9))
    ids = np.array([3, 17, 99, 150, 7, 42, 250, 1, 64, 88, 200, 5], np.int32)
    # host
    host_t = load_profile("host").cpu_target()
    mod, params = export_model(cfg, host_t, quant=quant)
    arrays = param_arrays(spec, quant=quant)
    with host_t:
        host = DecoderSession(tvm.compile(mod, target=host_t), [tvm.runtime.tensor(arrays[n]) for n, _, _ in params],
                              256, 64)
    want, tokens = [host.prefill(ids)], []
    for _ in range(4):
        tokens.append(int(np.argmax(want[-1])))
        want.append(host.decode(tokens[-1]))
    # aarch64 twin under QEMU
    arm_t = linux_twin_target()
    mod, params = export_model(cfg, arm_t, quant=quant, int8=quant is not None)
    arrays = param_arrays(spec, quant=quant, int8=quant is not None)
    with arm_t:
        ex = tvm.compile(mod, target=arm_t)
    ex.export_library(str(tmp_path / "model.so"), fcompile=toolchain_for("aarch64-linux-gnu").fcompile())
    np.savez(tmp_path / "params.npz", **{f"p{i:04d}": arrays[n] for i, (n, _, _) in enumerate(params)})
    np.save(tmp_path / "ids.npy", ids)

    runner = Path(__file__).parents[1] / "support" / "arm_model_runner.py"
    r = run_aarch64(str(runner), [str(tmp_path / "model.so"), str(tmp_path / "params.npz"),
                                  str(tmp_path / "ids.npy"), "4", str(tmp_path / "out.npz")])
    assert r.returncode == 0, r.stderr[-2000:]
    out = np.load(tmp_path / "out.npz")
    assert str(out["machine"]) == "aarch64"
    if quant is None:
        np.testing.assert_allclose(out["logits"], np.stack(want), rtol=1e-4, atol=1e-4 * np.abs(want[0]).max())
        return
    assert np.abs(out["logits"][0] - want[0]).max() < 0.05 * np.abs(want[0]).max()  # prefill: int8 GEMMs
    same = 1 + next((i for i, (a, b) in enumerate(zip(out["tokens"], tokens, strict=True)) if a != b), len(tokens))
    scale = np.abs(want[1]).max()
    for got, ref in zip(out["logits"][1:same], want[1:same], strict=True):  # decode steps fed the same tokens on both
        assert np.abs(got - ref).max() < 0.05 * scale
    assert not np.allclose(out["logits"][1], want[1], rtol=1e-5, atol=1e-5 * scale)  # the int8 kernels ran
