"""The numpy reference: weights loaded on use for models larger than memory, and windows run layer by layer."""

import numpy as np

from xpuc.compiler.frontends import load_model
from xpuc.compiler.reference import ReferenceModel, WeightCache
from xpuc.compiler.synth import synthesize, synthesize_moe


def test_weight_cache_keeps_the_most_recent_within_its_budget():
    loads = []
    src = {f"w{i}": np.full((4, 4), i, np.float32) for i in range(5)}
    counting = {k: v for k, v in src.items()}

    class Counting(dict):
        def __getitem__(self, k):
            loads.append(k)
            return super().__getitem__(k)

    cache = WeightCache(Counting(counting), list(src), "float16", budget=2 * 64)
    assert cache["w0"][0, 0] == 0 and cache["w1"][0, 0] == 1 and cache["w0"][0, 0] == 0
    assert loads == ["w0", "w1"]  # both fit: the second w0 was kept
    cache["w2"]  # over budget: the least recently used (w1) goes
    cache["w0"]
    assert loads == ["w0", "w1", "w2"]
    cache["w1"]
    assert loads[-1] == "w1" and len(cache) == 5 and sorted(cache) == sorted(src)


def test_lazy_reference_and_layer_major_windows_equal_the_eager_forward(tmp_path):
    for name, make in (("dense", lambda p: synthesize("tiny", 0.9, 0, p)),
                       ("moe", lambda p: synthesize_moe("tiny-moe", 0.88, 0, p))):
        make(tmp_path / name)
        spec = load_model(str(tmp_path / name))
        eager = ReferenceModel(spec, "float16")
        lazy = ReferenceModel(spec, "float16", resident_bytes=0)
        assert isinstance(lazy.w, WeightCache) and isinstance(eager.w, dict)
        windows = [np.arange(3, 40), np.arange(100, 117), np.array([7])]
        got = lazy.forward_windows(windows)
        for ids, g in zip(windows, got, strict=True):
            eager.reset()
            np.testing.assert_allclose(g, eager.forward(ids), rtol=1e-5, atol=1e-5)
