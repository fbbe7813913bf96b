"""Offloaded decoding: flash layout, FlashReader, NeuronCache, the four modes against numpy, soak."""

from __future__ import annotations

import zlib

import numpy as np
import pytest
from support.cli import xpuc
from support.models import reference_chunk_nll

from xpuc.compiler.reference import ReferenceModel
from xpuc.runtime.errors import XpucError
from xpuc.runtime.weights import read_header

LICENSE = "/usr/share/common-licenses/Apache-2.0"


def test_flash_layout_records_hot_first_aligned_and_checksummed(packed):
    from xpuc.runtime.formats.bundle import bundle_ffn
    from xpuc.runtime.formats.flash import FlashLayout

    d, spec = packed
    fl = FlashLayout.load(d / "art" / "flash.json")
    crcs = np.load(d / "art" / "ffn.crc32.npy")
    raw = (d / "art" / "ffn.bin").read_bytes()
    assert fl.aligned == (fl.cluster_bytes % 4096 == 0)
    assert fl.split == (fl.cluster == 1)  # clusters of one neuron of a gated FFN: gate rows apart (auto)
    assert crcs.shape == ((len(fl.layers), fl.n_clusters, 2) if fl.split else (len(fl.layers), fl.n_clusters))
    freq = np.asarray(profile_stats(d).frequency)
    for i, region in enumerate(fl.layers):
        assert region.offset % 4096 == 0
        order = np.asarray(region.order)
        assert sorted(order.tolist()) == list(range(fl.d_ff))  # every neuron exactly once
        assert np.all(np.diff(freq[i][order]) <= 1e-12)  # most frequent first (hot neurons lead)
        p = f"layers.{i}."
        want = bundle_ffn(fl.bundle_layout(fl.n_clusters), spec.weights[p + "up_proj"][order],
                          spec.weights[p + "down_proj"][:, order], spec.weights[p + "gate_proj"][order])
        got = np.zeros((fl.n_clusters, fl.cluster_bytes), np.uint8)  # the records put back together from parts
        for q, (pb, skip) in enumerate(zip(fl.part_bytes, fl.part_skip, strict=True)):
            base = fl.part_base(i, q)
            assert base % 4096 == 0
            for j in range(fl.n_clusters):
                chunk = raw[base + j * pb:base + (j + 1) * pb]
                got[j, skip:skip + pb] = np.frombuffer(chunk, np.uint8)
                assert zlib.crc32(chunk) == (crcs[i, j, q] if fl.split else crcs[i, j])
        np.testing.assert_array_equal(got.view(np.float16).reshape(want.shape), want)


def profile_stats(d):
    from xpuc.runtime.formats.profile_stats import ProfileStats

    return ProfileStats.load(d / "stats.json")


class _ClusterMaskedReference(ReferenceModel):
    """Numpy oracle of the sparse modes: each FFN over the clusters the predictor selects."""

    def __init__(self, spec, model) -> None:
        super().__init__(spec, "float16")
        self.model = model

    def ffn_block(self, i, x):
        from xpuc.compiler.reference import ffn

        clusters = self.model._predict(i, x[0].astype(np.float32))
        keep = np.isin(self.model._cluster_of[i], clusters)
        p = f"layers.{i}."
        return ffn(x, self.w[p + "gate_proj"][keep], self.w[p + "up_proj"][keep], self.w[p + "down_proj"][:, keep],
                   self.config.ffn_kind)


@pytest.mark.parametrize("mode", ["naive", "llmflash", "cache", "full"])
def test_modes_match_numpy(packed, mode):
    from xpuc.runtime.offload import OffloadModel

    d, spec = packed
    tokens = [5, 77, 300, 12, 9, 401, 33, 2]
    with OffloadModel(d / "art", mode, ffn_fraction=0.4, threads=2) as m:
        ref = ReferenceModel(spec, "float16") if mode == "naive" else _ClusterMaskedReference(spec, m)
        for t in tokens:
            got = m.decode(t)
            want = ref.forward([t])[0]
            np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-3 * np.abs(want).max())
        acct = m.accounted_bytes()
        if mode != "naive":  # the cache never holds more than the budget's share of the FFN
            fl = m.flash
            assert acct["ffn"] <= 0.4 * len(fl.layers) * fl.n_clusters * fl.cluster_bytes + 4096
            assert m.cache.hit_rate() > 0


def test_dense_prefill_matches_numpy_in_every_mode_and_reads_each_layer_once(packed):
    from xpuc.runtime.offload import OffloadModel

    d, spec = packed
    prompt = [5, 77, 300, 12, 9, 401, 33, 2]
    want = ReferenceModel(spec, "float16").forward(prompt)[-1]
    got = {}
    for mode in ("naive", "llmflash", "cache", "full"):
        with OffloadModel(d / "art", mode, ffn_fraction=0.4, threads=2) as m:
            before = m.reader.metrics()["bytes_read"]
            got[mode] = m.prefill_dense(prompt)
            read = m.reader.metrics()["bytes_read"] - before
            fl = m.flash
            # every layer's records once at most (resident ones come from the cache), not once per token
            assert read <= len(fl.layers) * fl.n_clusters * fl.cluster_bytes
            assert m.pos == len(prompt) and m.accounted_bytes()["prefill"] > 0
            np.testing.assert_allclose(got[mode], want, rtol=2e-3, atol=2e-3 * np.abs(want).max())
            # decoding continues from the prefilled KV cache like after stepping the prompt
            nxt = int(np.argmax(got[mode]))
            stepped = ReferenceModel(spec, "float16")
            stepped.forward(prompt)
            after = m.decode(nxt)
            if mode == "naive":  # the dense decode step continues exactly where the dense reference is
                np.testing.assert_allclose(after, stepped.forward([nxt])[0], rtol=5e-3,
                                           atol=5e-3 * np.abs(want).max())
    for mode in ("llmflash", "cache", "full"):
        np.testing.assert_allclose(got[mode], got["naive"], rtol=1e-5, atol=1e-5 * np.abs(want).max())
    # prefill: dense from DENSE_PREFILL_MIN_TOKENS tokens on, stepped below (same logits in naive mode)
    from xpuc.runtime import offload

    long = (prompt * 4)[:offload.DENSE_PREFILL_MIN_TOKENS]
    with OffloadModel(d / "art", "naive", ffn_fraction=0.4, threads=2) as m:
        calls = []
        dense_path = m.prefill_dense
        m.prefill_dense = lambda toks: calls.append(len(toks)) or dense_path(toks)
        dense = m.prefill(long)
        m.reset()
        short = m.prefill(long[:-1])
        assert calls == [len(long)] and m.pos == len(long) - 1  # the shorter prompt was stepped
    ref = ReferenceModel(spec, "float16")
    np.testing.assert_allclose(dense, ref.forward(long)[-1], rtol=2e-3, atol=2e-3 * np.abs(want).max())
    np.testing.assert_allclose(short, ReferenceModel(spec, "float16").forward(long[:-1])[-1], rtol=2e-3,
                               atol=2e-3 * np.abs(want).max())
    # a short prompt's FFN runs the compiled dense kernel per token, a long one dequantizes for numpy: the same
    from xpuc.runtime import offload_ffn

    few = (prompt * 2)[:offload_ffn.FEW_TOKENS]
    with OffloadModel(d / "art", "full", ffn_fraction=0.4, threads=2) as m:
        by_kernel = m.prefill_dense(few)
        m.reset()
        offload_ffn.FEW_TOKENS, saved = 0, offload_ffn.FEW_TOKENS
        try:
            by_numpy = m.prefill_dense(few)
        finally:
            offload_ffn.FEW_TOKENS = saved
    np.testing.assert_allclose(by_kernel, by_numpy, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    np.testing.assert_allclose(by_kernel, ReferenceModel(spec, "float16").forward(few)[-1], rtol=2e-3,
                               atol=2e-3 * np.abs(want).max())
    with OffloadModel(d / "art", "cache", ffn_fraction=0.4, threads=2) as m:
        with pytest.raises(XpucError, match="empty"):
            m.prefill_dense([])
        with pytest.raises(XpucError, match="outside the vocabulary"):
            m.prefill_dense([1, spec.config.vocab_size])
        assert m.pos == 0


def test_split_kernel_form_equals_the_fused_one(packed):
    """A plan's tuned ``ffn_kernel: split`` (gate kernel, then up/down) gives the fused kernel's logits."""
    from xpuc.runtime.offload import OffloadModel

    d, _ = packed
    out = {}
    for split in (False, True):
        with OffloadModel(d / "art", "cache", ffn_fraction=0.4, threads=2) as m:
            assert m.split_kernel is False  # the packed plan keeps the default form
            m.split_kernel = split
            out[split] = [m.decode(t) for t in (5, 77, 300)]
    for a, b in zip(out[False], out[True], strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4 * np.abs(a).max())


def test_modes_agree_and_cache_reads_less(packed, tmp_path):
    from xpuc.compiler.offload_bench import run_bench

    d, _ = packed
    text = run_bench(d / "art", ["naive", "llmflash", "cache", "full"], 0.4, None, 12, str(tmp_path / "b.json"),
                     quiet=True)
    import json

    rep = json.loads((tmp_path / "b.json").read_text())
    rows = {r["mode"]: r for r in rep["modes"]}
    assert rep["sparse_modes_agree"], rep["outputs"]
    # the generated model's activations are as hard to predict as a real model's (predictor precision ~0.3 on
    # this tiny shape), so full reads the predicted ~third of the cold neurons: well under half of naive's bytes
    assert rows["naive"]["bytes_read_per_token"] > 1.5 * rows["full"]["bytes_read_per_token"]
    assert rows["cache"]["hit_rate"] >= rows["llmflash"]["hit_rate"] - 0.05
    assert (tmp_path / "b.png").stat().st_size > 1000
    assert "full" in text


def test_soak_many_generations_no_leaks(packed):
    import psutil

    from xpuc.runtime.offload import OffloadModel

    d, _ = packed
    proc = psutil.Process()
    with OffloadModel(d / "art", "full", 0.3) as m:
        m.generate([1, 2, 3], 3)
        fds, rss = proc.num_fds(), proc.memory_info().rss
        for k in range(150):
            m.generate([k % 200 + 1, 7], 3)
        assert proc.num_fds() == fds
        assert proc.memory_info().rss - rss < 16 << 20
    threads = proc.num_threads()
    assert threads < 64


def test_oracle_mask_sparse_equals_dense(packed):
    """With the oracle's clusters (every firing neuron's cluster) the sparse modes equal the dense model."""
    from xpuc.runtime.offload import OffloadModel

    d, spec = packed
    ref = ReferenceModel(spec, "float16")
    with OffloadModel(d / "art", "full", 0.3) as m:
        def oracle(i, x):
            p = f"layers.{i}."
            g, u = ref.w[p + "gate_proj"] @ x, ref.w[p + "up_proj"] @ x
            return np.unique(m._cluster_of[i][(g > 0) & (u > 0)]).astype(np.int32)

        m.cluster_selector = oracle
        for t in [11, 250, 3, 97, 64]:
            want = ref.forward([t])[0]
            np.testing.assert_allclose(m.decode(t), want, rtol=2e-3, atol=2e-3 * np.abs(want).max())


@pytest.mark.parametrize("mode", ["cache", "full"])
def test_split_records_read_up_down_rows_only_for_neurons_whose_gate_fired(packed, mode):
    """Exact up/down masks: with split records every up/down read is of a neuron whose gate fired (computed by
    the compiled gate kernel), misses beyond the cold segment go in waves, and the bytes of the fired records
    are reported per token."""
    from xpuc.runtime.offload import OffloadModel

    d, _ = packed
    with OffloadModel(d / "art", mode, 0.3) as m:
        if not m.exact:
            pytest.skip("records stored whole")
        fired_slots, updown_slots = set(), []
        fires, part_reads = m._fires, m._part_reads

        def spy_fires(i, g):
            out = fires(i, g)
            fired_slots.update(int(s) for s in spy_fires.slots[out])
            return out

        def spy_part_reads(i, clusters, slots, parts):
            if list(parts) == [1]:
                updown_slots.extend(int(s) for s in slots)
            return part_reads(i, clusters, slots, parts)

        gate = m._gate

        def spy_gate(x, slots, idx, g):
            spy_fires.slots = np.asarray(slots)
            return gate(x, slots, idx, g)

        m._fires, m._part_reads, m._gate = spy_fires, spy_part_reads, spy_gate
        m.prefill([5])
        for t in [11, 250, 3, 97]:
            m.decode(t)
        assert updown_slots and set(updown_slots) <= fired_slots
        assert all(tm.fired_bytes > 0 for tm in m.token_metrics)
        waves = max(-(-m.flash.n_clusters // max(s.n_cold, 1)) for s in m.cache.layers)
        assert waves > 1  # this budget makes a token's misses overflow the cold segment


def test_units_whose_clusters_always_fire_skip_the_predictor(packed, monkeypatch):
    """The generated model is sparse, so every unit runs its predictor; a unit expected to fire everywhere computes
    all its clusters without one (exact: the dense model), and the predictor is never called for it."""
    from xpuc.runtime import offload_ffn
    from xpuc.runtime.offload import OffloadModel

    d, spec = packed
    with OffloadModel(d / "art", "cache", 0.5) as m:
        assert not m.always_active.any()
    monkeypatch.setattr(offload_ffn, "PREDICTOR_MIN_IDLE", 2.0)  # every unit counts as always active
    ref = ReferenceModel(spec, "float16")
    with OffloadModel(d / "art", "full", 0.5) as m:
        assert m.always_active.all()
        monkeypatch.setattr(m, "_mask_clusters", lambda mask: pytest.fail("the predictor's mask was used"))
        for t in [11, 250, 3]:
            want = ref.forward([t])[0]
            np.testing.assert_allclose(m.decode(t), want, rtol=2e-3, atol=2e-3 * np.abs(want).max())


def test_wholly_resident_dense_model_decodes_in_one_call_per_token(packed, monkeypatch):
    """FFN wholly in memory and computed in full: the one-call step (decode_resident) is taken, gives the very
    logits of the per-layer calls and matches numpy; with part of the FFN on flash it is not taken."""
    from xpuc.runtime import offload_ffn
    from xpuc.runtime.offload import OffloadModel

    d, spec = packed
    monkeypatch.setattr(offload_ffn, "PREDICTOR_MIN_IDLE", 2.0)  # every unit counts as always active
    with OffloadModel(d / "art", "full", 0.5) as m:
        assert m._resident is None  # half of the FFN on flash
    ref = ReferenceModel(spec, "float16")
    with OffloadModel(d / "art", "cache", 1.0) as m:
        assert m._resident is not None
        monkeypatch.setattr(m, "_ffn_layer", lambda *a: pytest.fail("a per-layer FFN call was made"))
        one_call = [m.prefill([7, 19])] + [m.decode(t) for t in (11, 250, 3)]
        want = ref.forward([7, 19, 11, 250, 3])
        np.testing.assert_allclose(one_call[-1], want[-1], rtol=2e-3, atol=2e-3 * np.abs(want).max())
        assert m.cache.hit_rate() == 1.0
        monkeypatch.undo()
        monkeypatch.setattr(offload_ffn, "PREDICTOR_MIN_IDLE", 2.0)
        m._resident = None  # the per-layer calls, same kernels
        m.reset()
        per_layer = [m.prefill([7, 19])] + [m.decode(t) for t in (11, 250, 3)]
    for a, b in zip(one_call, per_layer, strict=True):
        np.testing.assert_array_equal(a, b)


def test_native_and_python_readers_agree(packed):
    from xpuc.runtime.flash_reader import FlashReader, RecordRows, aligned_empty
    from xpuc.runtime.formats.flash import FlashLayout

    d, _ = packed
    fl = FlashLayout.load(d / "art" / "flash.json")
    crcs = np.load(d / "art" / "ffn.crc32.npy")
    want = np.array([0, 1, 3, fl.n_clusters - 1])
    rb = fl.part_bytes[0]  # whole records, or split records' gate parts
    offs = fl.part_base(1, 0) + want * rb
    out = []
    for native, rows in ((False, False), (True, False), (False, True), (True, True)):
        with FlashReader(d / "art" / "ffn.bin", rb, queue_depth=3, native=native) as r:
            if rows:  # into rows of a pool, from a byte offset in each row (a split record's part)
                pool = aligned_empty((9, rb + 40), "uint8")
                r.read(offs, RecordRows(pool, np.array([7, 0, 4, 2]), 40),
                       crcs.reshape(*crcs.shape[:2], -1)[1, want, 0])
                dest = pool[[7, 0, 4, 2], 40:]
            else:
                dest = aligned_empty((len(want), rb), "uint8")
                r.read(offs, list(dest), crcs.reshape(*crcs.shape[:2], -1)[1, want, 0])
            out.append(dest.copy())
            assert r.metrics()["records"] == len(want)
    raw = (d / "art" / "ffn.bin").read_bytes()
    for o in out[1:]:
        np.testing.assert_array_equal(out[0], o)
    assert out[0][2].tobytes() == raw[offs[2]:offs[2] + rb]


@pytest.mark.parametrize("fmt", ["q8_0", "q4_1"])
def test_quantized_fixed_segment_matches_numpy(packed, tmp_path, fmt):
    """`xpuc pack --fixed-dtype`: attention, embedding and LM head in GGML blocks, run by the quantized GEMV."""
    from xpuc.compiler.offload_pack import load_offload_artifact
    from xpuc.runtime.offload import OffloadModel
    from xpuc.schedules.linear_quant import dequantize_rows, quantize_rows

    d, spec = packed
    r = xpuc("pack", str(d / "model"), "--stats", str(d / "stats.json"), "--plan", str(d / "plan.json"),
             "--predictor", str(d / "pred.safetensors"), "--fixed-dtype", fmt, "-o", str(tmp_path / "art"))
    assert r.returncode == 0, r.stderr
    art = load_offload_artifact(tmp_path / "art")
    assert art.fixed_dtype == fmt and read_header(art.path / "fixed.safetensors")[0]["layers.0.qkv"]["dtype"] == "U8"
    w = dict(spec.weights.items())
    for k in list(w):
        if w[k].ndim == 2 and k.split(".")[-1] not in ("gate_proj", "up_proj", "down_proj"):
            f = "q8_0" if k in ("embed_tokens", "lm_head") else fmt  # embedding / LM head as `compile --quantize`
            w[k] = dequantize_rows(quantize_rows(w[k], f), f)
    from support.models import spec_from

    ref = ReferenceModel(spec_from(spec.config, w), "float32")
    ref.w.update({k: v.astype(np.float16).astype(np.float32) for k, v in spec.weights.items()
                  if k.split(".")[-1] in ("gate_proj", "up_proj", "down_proj")})  # fp16 FFN records
    with OffloadModel(tmp_path / "art", "naive", ffn_fraction=0.4, threads=2) as m:
        got, want = m.prefill([5, 77, 300, 12, 9, 401, 33]), ref.forward([5, 77, 300, 12, 9, 401, 33])[-1]
        np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-3 * np.abs(want).max())
        for t in (2, 61):
            got, want = m.decode(t), ref.forward([t])[0]
            np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-3 * np.abs(want).max())
        fixed = _matrix_bytes(m)
    with OffloadModel(d / "art", "naive", ffn_fraction=0.4, threads=2) as m16:
        assert fixed < 0.6 * _matrix_bytes(m16)  # the fixed segment's matrices shrank


def _matrix_bytes(m) -> int:
    def nbytes(t):
        return int(np.prod(t.shape)) * np.dtype(str(t.dtype)).itemsize

    tables = [m.embed_table] + ([] if m.head_table is m.embed_table else [m.head_table])
    return sum(nbytes(t) for t in tables) + sum(nbytes(d["attn"][1]) + nbytes(d["attn"][2]) for d in m.layers)


def test_neuron_cache_evicts_least_recent_and_never_in_use():
    from xpuc.runtime.neuron_cache import NeuronCache

    cache = NeuronCache((1, 1, 4), "float32", n_clusters=20, hot=[2], cold=[4])
    seg = cache.layers[0]
    none = np.array([], np.int64)
    assert cache.victims(0, 3, none) == [2, 3, 4]  # empty slots first, in order
    cache.assign(0, np.array([10, 11, 12, 13]), np.array([2, 3, 4, 5]))  # token 0
    cache.next_token()
    hits, miss = cache.lookup(0, np.array([0, 12, 10, 7]))  # token 1: hot 0, cold 12 then 10; 7 missing
    assert hits.tolist() == [0, 2, 4] and miss.tolist() == [7]
    # least recent first: 11, 13 (filled in that order), then 12 before 10 (used in that order)
    assert cache.victims(0, 4, none) == [3, 5, 4, 2]
    assert cache.victims(0, 4, np.array([13, 12])) == [3, 2]  # clusters in use this token are kept
    cache.next_token()
    cache.lookup(0, np.array([11]))
    assert cache.victims(0, 2, none) == [5, 4]
    cache.assign(0, np.array([7]), np.array([5]))  # 13 evicted, 7 in its slot
    assert seg.slot_of[13] == -1 and seg.slot_of[7] == 5 and cache.owner[5] == 7
    assert cache.victims(0, 4, none) == [4, 2, 3, 5]


def test_window_cache_drops_neurons_that_leave_the_window():
    """LLM-in-a-flash's windowing: after each token only the clusters used in the last W tokens stay, even with
    free room (an LRU cache of the same size would keep them and hit)."""
    from xpuc.runtime.neuron_cache import NeuronCache

    window, lru = (NeuronCache((1, 1, 4), "float32", n_clusters=20, hot=[0], cold=[8], policy=p, window=2)
                   for p in ("window", "lru"))
    for cache in (window, lru):
        cache.assign(0, np.array([3, 4]), np.array([0, 1]))  # token 0 uses 3 and 4
        cache.next_token()
        cache.lookup(0, np.array([4]))  # token 1 uses 4 again
        cache.assign(0, np.array([9]), np.array([2]))  # and reads 9
        cache.next_token()
    # token 2: 3 was last used at token 0, outside the 2-token window -> dropped, its slot free
    assert window.layers[0].slot_of[3] == -1 and window.owner[0] == -1
    assert window.layers[0].slot_of[[4, 9]].tolist() == [1, 2]
    assert lru.layers[0].slot_of[3] == 0
    hits, miss = window.lookup(0, np.array([3, 4]))
    assert hits.tolist() == [1] and miss.tolist() == [3]
    assert window.victims(0, 1, np.array([3, 4])) == [0]  # the freed slot first


def test_packed_model_perplexity_in_naive_mode_equals_the_dense_reference(packed):
    """``xpuc perplexity PACKED --mode naive`` (every neuron streamed from flash) scores the text as the dense
    numpy model does; ``full`` with half the FFN on flash is measured beside it (the predictor's cost)."""
    import json
    from pathlib import Path

    from xpuc.runtime.tokenizer import XpucTokenizer

    d, spec = packed
    got = {}
    for mode in ("naive", "full"):
        r = xpuc("perplexity", str(d / "art"), "--text", LICENSE, "--ctx", "24", "--chunks", "2", "--mode", mode,
                 "--budget", "50%", "--json")
        assert r.returncode == 0, r.stderr
        got[mode] = json.loads(r.stdout)
    tok = XpucTokenizer.from_artifact_dir(d / "art")
    ids = tok.encode(Path(LICENSE).read_text(), add_bos=False)
    ref = ReferenceModel(spec, "float32")
    nll = reference_chunk_nll(ref, ids, 24, 2, tok.bos_token_id if tok.add_bos else None)
    assert got["naive"]["tokens_scored"] == len(nll) == got["full"]["tokens_scored"]
    assert got["naive"]["ppl"] == pytest.approx(float(np.exp(np.mean(nll))), rel=1e-3)
    assert "mode full, FFN 50 % in memory" in got["full"]["engine"] and got["full"]["ppl"] > 0
