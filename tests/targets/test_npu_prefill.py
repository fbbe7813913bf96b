"""`xpuc compile --prefill-on npu`: the prefill module for the Hexagon DSP's HVX units.

Nothing here executes Hexagon code. Checked: the artifact's NPU library is an ELF32 Hexagon shared object
whose kernels use HVX (vector loads/stores, qfloat arithmetic); the manifest and `inspect` describe it; the
very TIR the NPU build compiles (CPU phases with 32-lane vectors and 4 DSP threads) gives the numpy
reference's logits when built for the host; a device without an NPU is a clean error.
"""

from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import pytest
import tvm
from support.cli import assert_clean_error, compile_tiny, xpuc
from support.models import random_weights, spec_from, tiny_config

pytestmark = pytest.mark.arm


@pytest.fixture(scope="module")
def npu_artifact(tmp_path_factory):
    missing = [t for t in ("clang", "ld.lld", "llvm-readelf") if shutil.which(t) is None]
    if missing:
        pytest.skip(f"missing {missing}")
    d = tmp_path_factory.mktemp("npu")
    compile_tiny(d, "--device", "oneplus-12", "--prefill-on", "npu")
    return d


def test_npu_module_is_a_hexagon_library_with_hvx(npu_artifact):
    art = npu_artifact / "art"
    m = json.loads((art / "manifest.json").read_text())
    mods = {mod["name"]: mod for mod in m["modules"]}
    assert mods["model"]["role"] == "decode"
    npu = mods["prefill_npu"]
    assert npu["role"] == "prefill" and npu["mtriple"] == "hexagon" and '"kind":"hexagon"' in npu["target"]
    assert "+hvx-length128b" in npu["target"] and npu["weights"] == "params_npu.safetensors"
    kernels = set(npu["kernels"])
    assert {"batch_prefill_paged_kv_cpu", "rms_norm", "fused_rope"} <= kernels  # attention, norms, RoPE
    assert any(k.startswith(("matmul", "fused_matmul")) for k in kernels)
    assert npu["info"]["hvx_vector_memory_ops"] > 500 and npu["info"]["hvx_qfloat_ops"] > 500
    header = subprocess.run(["llvm-readelf", "-h", str(art / "prefill_npu.so")], capture_output=True, text=True).stdout
    assert "ELF32" in header and "Hexagon" in header
    assert set(m["files"]) >= {"prefill_npu.so", "params_npu.safetensors"}
    r = xpuc("inspect", str(art))
    assert r.returncode == 0 and "prefill on hexagon" in r.stdout and "HVX vector loads/stores" in r.stdout


def test_npu_scheduled_tir_matches_the_reference_on_the_host():
    """Lower exactly as the NPU build does (same phases, same target), then compile that TIR for the host."""
    from tvm import relax

    from xpuc.compiler.pipeline import lower
    from xpuc.compiler.reference import ReferenceModel
    from xpuc.compiler.relax_model import export_model, param_arrays
    from xpuc.runtime.session import DecoderSession
    from xpuc.targets.profile import load_profile

    cfg = tiny_config()
    spec = spec_from(cfg, random_weights(cfg, 5))
    npu = load_profile("oneplus-12").npu_target()
    mod, params = export_model(cfg, tvm.target.Target({"kind": "llvm", "mtriple": "hexagon"}), kernels="generic",
                               functions=("prefill", "create_paged_kv_cache"))
    lowered = lower(mod, npu)
    script = lowered.script()
    assert "T.vectorized(T.int64(32))" in script and "T.parallel" in script  # 128-byte HVX vectors, DSP threads
    host = load_profile("host").cpu_target()
    with host:
        ex = tvm.compile(lowered, target=host, relax_pipeline=relax.pipeline.default_build_pipeline())
    arrays = param_arrays(spec, kernels="generic")
    sess = DecoderSession(ex, [tvm.runtime.tensor(np.ascontiguousarray(arrays[n])) for n, _, _ in params], 64)
    ids = [int(t) for t in np.random.default_rng(1).integers(0, cfg.vocab_size, 23)]
    got = sess.prefill(ids)
    want = ReferenceModel(spec, weight_dtype="float16").forward(ids)[-1]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_device_without_npu(tmp_path, npu_artifact):
    r = xpuc("compile", str(npu_artifact / "tiny.gguf"), "-o", str(tmp_path / "o"), "--prefill-on", "npu")
    assert_clean_error(r, "has no NPU")
    assert not (tmp_path / "o").exists()


def test_onnx_graph_for_the_npu(tmp_path):
    """An imported ONNX prefill graph lowered for the NPU: one Hexagon library; running it here is refused."""
    if shutil.which("llvm-readelf") is None:
        pytest.skip("llvm-readelf not installed")
    from xpuc.compiler.onnx_export import decoder_prefill_onnx
    from xpuc.runtime.formats.arch import ArchConfig

    cfg = ArchConfig("llama", 64, 64, 96, 1, 4, 2, 16, 1e4, 1e-5, "swiglu", True, False, 256)
    path = decoder_prefill_onnx(tmp_path / "dec.onnx", cfg, random_weights(cfg, 3))
    r = xpuc("compile", str(path), "-o", str(tmp_path / "art"), "--device", "oneplus-12", "--prefill-on", "npu")
    assert r.returncode == 0, r.stderr
    m = json.loads((tmp_path / "art" / "manifest.json").read_text())
    (graph,) = m["modules"]
    assert graph["mtriple"] == "hexagon" and graph["info"]["hvx_vector_memory_ops"] > 0
    assert any(k.startswith(("matmul", "fused_matmul")) for k in graph["kernels"])
    header = subprocess.run(["llvm-readelf", "-h", str(tmp_path / "art" / "graph.so")], capture_output=True,
                            text=True).stdout
    assert "Hexagon" in header
    np.savez(tmp_path / "in.npz", x=np.zeros((1, 4, 64), np.float32))
    assert_clean_error(xpuc("run", str(tmp_path / "art"), "--inputs", str(tmp_path / "in.npz")),
                       "compiled for hexagon")


@pytest.mark.parametrize("lanes", [1, 32])
def test_hexagon_math_rules_compute_the_functions(lanes):
    """The NPU build's lowering of math intrinsics (C library calls, one per lane of a vector; sigmoid through
    expf), put in a function built for the host, against numpy."""
    from tvm import tirx

    from xpuc.targets.hexagon import route_math_to_libm

    route_math_to_libm()
    bufs = [tirx.decl_buffer((lanes,), "float32", n) for n in "ABCD"]
    idx = tirx.Ramp(tirx.IntImm("int32", 0), tirx.IntImm("int32", 1), lanes) if lanes > 1 else tirx.IntImm("int32", 0)
    x = tirx.BufferLoad(bufs[0], [idx])
    three = tirx.FloatImm("float32", 3.0)

    def rule(op):
        return tvm.ir.Op.get(f"tirx.{op}").get_attr("hexagon.FLowerIntrinsic")

    exprs = [rule("sigmoid")(tirx.sigmoid(x)),
             rule("pow")(tirx.pow(x, tirx.Broadcast(three, lanes) if lanes > 1 else three)),
             rule("floor")(tirx.floor(x))]
    assert all("call_pure_extern" in str(e) and "tirx.sigmoid" not in str(e) for e in exprs)
    body = tirx.SeqStmt([tirx.BufferStore(b, e, [idx]) for b, e in zip(bufs[1:], exprs, strict=True)])
    lib = tvm.compile(tvm.IRModule({"main": tirx.PrimFunc(bufs, body).with_attr("global_symbol", "main")}),
                      target="llvm")
    a = np.random.default_rng(lanes).standard_normal(lanes).astype("float32") * 3
    ts = [tvm.runtime.tensor(a)] + [tvm.runtime.tensor(np.zeros(lanes, "float32")) for _ in range(3)]
    lib["main"](*ts)
    np.testing.assert_allclose(ts[1].numpy(), 1 / (1 + np.exp(-a)), rtol=1e-6)
    np.testing.assert_allclose(ts[2].numpy(), a ** 3, rtol=1e-6)
    np.testing.assert_array_equal(ts[3].numpy(), np.floor(a))
