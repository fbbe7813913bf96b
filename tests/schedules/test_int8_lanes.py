"""The lane layout of the int8 kernels: the same bytes as the GGUF blocks, rearranged so that one 512-bit register
holds 8 values of 8 rows; the kernels that read it (GEMV, gate/up, GEMM, embedding, float32 prefill panel)
against numpy. The GEMV / GEMM over every format are in test_int8_gemv.py (N = 48: lane layout)."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from support.gguf_blocks import random_rows

from xpuc.schedules.int8_dot import int8_dot_isa
from xpuc.schedules.lane_layout import LANE_FORMATS, field_offset, from_lanes, to_lanes, uses_lanes
from xpuc.schedules.linear_quant import (
    dequantize_matrix,
    embedding_quant,
    gate_up_act_quant,
    interleave_rows,
    linear_quant,
)
from xpuc.schedules.quant_formats import BLOCKS
from xpuc.targets.profile import load_profile

TARGET = load_profile("host").cpu_target()
VNNI = pytest.mark.skipif(int8_dot_isa(TARGET) != "avx512vnni", reason="the lane kernels need AVX-512 VNNI")


def _t(a):
    return tvm.runtime.tensor(np.ascontiguousarray(a))


def _build(func):
    return tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=TARGET)["main"]


def _in_features(fmt: str) -> int:
    return 512 if fmt.endswith("_k") else 96


@pytest.mark.parametrize("fmt", LANE_FORMATS)
def test_lanes_rearrange_the_blocks_bytes_and_round_trip(fmt):
    rng = np.random.default_rng(1)
    K = _in_features(fmt)
    rows = random_rows(rng, fmt, 32, K)
    plain = interleave_rows(rows, fmt, K)
    lanes = interleave_rows(rows, fmt, K, int8=True)
    assert lanes.shape == plain.shape and not np.array_equal(lanes, plain)
    assert np.array_equal(np.sort(lanes, axis=None), np.sort(plain, axis=None))  # the same bytes
    assert np.array_equal(from_lanes(lanes, fmt), plain) and np.array_equal(to_lanes(plain, fmt), lanes)
    chunk = lanes[1, 0].reshape(-1)  # row group 1, block 0: rows 8..15
    d_at = {"q6_k": 208}.get(fmt, 0)
    for r in range(8):  # the 8 rows' fp16 scales side by side
        assert bytes(chunk[field_offset(fmt, "d") + 2 * r:][:2]) == bytes(rows[8 + r, d_at:d_at + 2])
    np.testing.assert_array_equal(dequantize_matrix(lanes, fmt, int8=True), dequantize_matrix(plain, fmt))


def test_q5_0_high_bits_are_one_mask_per_8_values_of_8_rows():
    rng = np.random.default_rng(2)
    rows = random_rows(rng, "q5_0", 16, 32)
    chunk = interleave_rows(rows, "q5_0", 32, int8=True)[0, 0].reshape(-1)  # rows 0..7
    qh = np.unpackbits(rows[:8, 2:6], axis=1, bitorder="little")  # (row, value)
    at = field_offset("q5_0", "qh")
    for i in range(4):
        word = np.unpackbits(chunk[at + 8 * i: at + 8 * i + 8], bitorder="little")  # bit b: row b // 8
        np.testing.assert_array_equal(word.reshape(8, 8), qh[:, 8 * i: 8 * i + 8])


def test_which_matrices_go_lane_by_lane():
    assert uses_lanes("q5_0", 9728, True) and uses_lanes("q6_k", 896, True)
    assert not uses_lanes("q5_0", 9728, False)  # float32 kernels keep the per-row layout
    assert not uses_lanes("q4_1", 40, True)  # 16-row prefill tasks
    assert not uses_lanes(None, 64, True)
    assert set(LANE_FORMATS) == set(BLOCKS)


@VNNI
@pytest.mark.parametrize("fmt", LANE_FORMATS)
def test_embedding_reads_the_lane_layout_exactly(fmt):
    rng = np.random.default_rng(3)
    K, vocab = _in_features(fmt), 48
    storage = interleave_rows(random_rows(rng, fmt, vocab, K), fmt, K, int8=True)
    ids = np.array([[0, 7, 8, 47, 21]], np.int32)
    h = tvm.runtime.empty((1, 5, K), "float32")
    _build(embedding_quant(vocab, K, fmt, True))(_t(ids), _t(storage), h)
    np.testing.assert_array_equal(h.numpy()[0], dequantize_matrix(storage, fmt, int8=True)[ids[0]])


@VNNI
@pytest.mark.parametrize("fmt", ["q4_k", "q6_k", "q8_0"])
def test_lane_gemv_streams_several_row_groups_and_blocks(fmt):
    """More row groups than the prefetch distance and several K blocks: the GEMV over lanes vs numpy, and the
    float32 / int8 prefill from the same storage."""
    from xpuc.runtime.formats.bundle import int8_activations

    rng = np.random.default_rng(4)
    K, N = 768 if fmt.endswith("_k") else 320, 256
    storage = interleave_rows(random_rows(rng, fmt, N, K), fmt, K, int8=True)
    w = dequantize_matrix(storage, fmt, int8=True)
    f = _build(linear_quant(K, N, fmt, 16, True))
    for n in (1, 7):
        x = rng.standard_normal((1, n, K)).astype(np.float32)
        y = tvm.runtime.empty((1, n, N), "float32")
        f(_t(x), _t(storage), y)
        want = (np.stack([int8_activations(r) for r in x[0]]) if n == 1 or fmt != "q6_k" else x[0]) @ w.T
        np.testing.assert_allclose(y.numpy()[0], want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


@VNNI
@pytest.mark.parametrize("fmt", ["q4_k", "q6_k"])
def test_gate_up_over_lanes_skips_the_neurons_below_threshold(fmt):
    from xpuc.runtime.formats.bundle import activation, int8_activations

    rng = np.random.default_rng(5)
    d, F = 256, 64
    storage = interleave_rows(random_rows(rng, fmt, 2 * F, d, scale=0.05), fmt, d, int8=True)
    wd = dequantize_matrix(storage, fmt, int8=True)
    x = rng.standard_normal((1, 1, d)).astype(np.float32)
    xi = int8_activations(x[0, 0])
    g, u = wd[:F] @ xi, wd[F:] @ xi
    a = np.sort(np.abs(g / (1 + np.exp(-g))))
    thr = float(a[F // 2 - 1: F // 2 + 1].mean())  # between two neurons
    h = _t(np.zeros((1, 1, F), np.float32))
    _build(gate_up_act_quant(d, F, fmt, "swiglu", True))(_t(x), _t(storage), _t(np.array([thr], np.float32)), h)
    want = activation("swiglu", g, u, thr)
    np.testing.assert_allclose(h.numpy()[0, 0], want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    assert 0.3 < float((h.numpy() == 0).mean()) < 0.7
