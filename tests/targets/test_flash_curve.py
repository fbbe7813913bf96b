"""The disk's measured read curve: measured with the runtime's reader, stored for the host profile, used by the
planner to choose the queue depth."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from support.cli import assert_clean_error, xpuc

from xpuc.compiler.planner import plan_neurons
from xpuc.runtime.errors import XpucError
from xpuc.runtime.formats.arch import ArchConfig
from xpuc.runtime.formats.profile_stats import ProfileStats
from xpuc.runtime.native import batch_reader
from xpuc.targets.flash_curve import FlashCurve, curve_path, measure_read_curve, nearest_point
from xpuc.targets.profile import load_profile

native = pytest.mark.skipif(batch_reader() is None, reason="no C compiler for the native reader")


@pytest.fixture
def disk_file(tmp_path):
    p = tmp_path / "big.bin"
    p.write_bytes(np.random.default_rng(0).integers(0, 256, 8 << 20, np.uint8).tobytes())
    return p


@native
def test_measured_curve_has_every_point_and_survives_a_round_trip(disk_file, tmp_path):
    curve = measure_read_curve(disk_file, blocks_kib=(4, 64), depths=(1, 4), seconds=0.05)
    assert [(p["block_kib"], p["queue_depth"]) for p in curve.points] == [(4, 1), (4, 4), (64, 1), (64, 4)]
    assert all(p["random_mbps"] > 0 and p["iops"] > 0 for p in curve.points)
    assert curve.engine in ("aio", "threads") and curve.file_bytes == 8 << 20
    back = FlashCurve.load(curve.save(tmp_path / "c.json"))
    assert back == curve
    assert back.mbps(50, 3) == nearest_point(curve.points, 64, 4)["random_mbps"]


def test_a_file_too_small_or_missing_is_refused(tmp_path):
    (tmp_path / "small.bin").write_bytes(b"x" * 4096)
    with pytest.raises(XpucError, match="too small"):
        measure_read_curve(tmp_path / "small.bin")
    assert_clean_error(xpuc("targets", "--measure-flash", str(tmp_path / "nope.bin")), "no such file")


def _curve(points):
    return FlashCurve("/disk", 1 << 30, "aio", 0.5, "2026-01-01T00:00:00+00:00",
                      [{"block_kib": b, "queue_depth": d, "random_mbps": v, "iops": 1} for b, d, v in points])


def test_host_profile_and_planner_use_the_stored_curve(monkeypatch, tmp_path):
    """The stored curve becomes the host's ``flash.read_curve``; the plan's queue depth is the smallest depth
    reaching 80 % of the best at the record's block size (8 KiB here: 700 of 800 MB/s at depth 16)."""
    monkeypatch.setenv("XPUC_CACHE", str(tmp_path))
    assert "not measured" in load_profile("host").flash["kind"]
    pts = [(8, 1, 100.0), (8, 4, 300.0), (8, 16, 700.0), (8, 64, 800.0), (1024, 1, 2000.0), (1024, 64, 2100.0)]
    curve_path().parent.mkdir(parents=True)
    _curve(pts).save(curve_path())
    host = load_profile("host")
    assert "measured 2026-01-01, aio" in host.flash["kind"] and len(host.flash["read_curve"]) == len(pts)
    cfg = ArchConfig("mistral", 1000, 1024, 2048, 2, 8, 8, 128, 1e4, 1e-5, "drelu", False, False, 512)
    stats = ProfileStats(cfg.to_dict(), "0" * 16, 100, None, [0.0] * 2, np.full((2, 2048), 0.1).tolist())
    plan = plan_neurons(cfg, stats, host, 1 << 30, "q4_0", cluster=1)  # record 1728 B -> 4 KiB blocks: nearest 8
    assert plan.read_block_bytes == 4096 and plan.queue_depth == 16
    steeper = dataclasses.replace(host, flash={"read_curve": _curve([(4, 1, 10.0), (4, 2, 900.0),
                                                                     (4, 8, 1000.0)]).read_curve()})
    assert plan_neurons(cfg, stats, steeper, 1 << 30, "q4_0", cluster=1).queue_depth == 2
