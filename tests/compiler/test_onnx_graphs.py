"""Whole ONNX graphs through `xpuc compile` / GraphRunner against onnxruntime: the real CNN graph
structures shipped with `onnx` (small weights) and a decoder prefill graph."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from xpuc.runtime.errors import XpucError

LIGHT = Path(__import__("onnx").__file__).parent / "backend" / "test" / "data" / "light"


def _ort(path: Path, feeds: dict) -> list[np.ndarray]:
    ort = pytest.importorskip("onnxruntime")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def _first_input(path: Path):
    import onnx

    model = onnx.load(str(path))
    inits = {t.name for t in model.graph.initializer}
    inp = next(i for i in model.graph.input if i.name not in inits)
    return inp.name, [d.dim_value or 1 for d in inp.type.tensor_type.shape.dim]


def _compile(path: Path, out: Path):
    from xpuc.compiler.build import compile_onnx
    from xpuc.runtime.graph import GraphRunner

    return GraphRunner(compile_onnx(path, out, quiet=True))


@pytest.mark.parametrize("name", ["light_squeezenet", "light_shufflenet", "light_resnet50"])
def test_light_cnn_graphs_match_onnxruntime(name, tmp_path):
    path = LIGHT / f"{name}.onnx"
    input_name, shape = _first_input(path)
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    want = _ort(path, {input_name: x})
    got = _compile(path, tmp_path / "art")(x)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-3, atol=1e-3 * max(1.0, float(np.abs(w).max())))


def test_decoder_prefill_graph_matches_onnxruntime_and_reference(tmp_path):
    from support.models import random_weights

    from xpuc.compiler.onnx_export import causal_mask, decoder_prefill_onnx, rope_tables
    from xpuc.compiler.reference import ReferenceModel
    from xpuc.compiler.spec import LazyWeights, ModelSpec
    from xpuc.runtime.formats.arch import ArchConfig

    cfg = ArchConfig("llama", 64, 64, 96, 2, 4, 2, 16, 1e4, 1e-5, "swiglu", True, False, 256)
    w = random_weights(cfg, 3)
    path = decoder_prefill_onnx(tmp_path / "dec.onnx", cfg, w)
    runner = _compile(path, tmp_path / "art")
    for seq in (5, 12):  # one artifact, symbolic sequence length
        x = np.random.default_rng(seq).standard_normal((1, seq, 64)).astype(np.float32)
        cos, sin = rope_tables(seq, 16, 1e4)
        feeds = {"x": x, "cos": cos, "sin": sin, "mask": causal_mask(seq)}
        want = _ort(path, feeds)[0]
        got = runner(x, cos, sin, causal_mask(seq))[0]
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
        ref = ReferenceModel(ModelSpec(cfg, LazyWeights({k: (lambda v=v: v) for k, v in w.items()}), None, "r", "t"))
        h = x[0]
        for i in range(cfg.num_layers):
            h = ref.layer(i, h, np.arange(seq))
        np.testing.assert_allclose(got[0], h, rtol=1e-3, atol=1e-3 * np.abs(h).max())


def test_cli_compile_and_run_graph(tmp_path):
    import subprocess
    import sys

    path = LIGHT / "light_squeezenet.onnx"
    r = subprocess.run([sys.executable, "-m", "xpuc.compiler.cli", "compile", str(path), "-o", str(tmp_path / "a")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    input_name, shape = _first_input(path)
    np.savez(tmp_path / "in.npz", **{input_name: np.zeros(shape, np.float32)})
    r = subprocess.run([sys.executable, "-m", "xpuc.compiler.cli", "run", str(tmp_path / "a"), "--inputs",
                        str(tmp_path / "in.npz"), "--output", str(tmp_path / "out.npz")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert len(np.load(tmp_path / "out.npz").files) == 1
    r = subprocess.run([sys.executable, "-m", "xpuc.compiler.cli", "run", str(tmp_path / "a")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "--inputs" in r.stderr and "Traceback" not in r.stderr


def test_not_an_onnx_file(tmp_path):
    from xpuc.compiler.build import compile_onnx

    bad = tmp_path / "x.onnx"
    bad.write_bytes(b"\x00\x01garbage")
    with pytest.raises(XpucError):
        compile_onnx(bad, tmp_path / "out", quiet=True)
    assert not (tmp_path / "out").exists()
