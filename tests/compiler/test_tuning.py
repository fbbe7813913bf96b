"""Tuning jobs: `xpuc tune` (XGBoost-guided meta_schedule), resume/interrupt, databases applied by
`xpuc compile --tuning-db`, merge, bad databases, and device farms over RPC (loopback x86 + QEMU aarch64)."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from xpuc.compiler.cli import main as cli
from xpuc.compiler.onnx_export import causal_mask, decoder_prefill_onnx, rope_tables
from xpuc.runtime.formats.arch import ArchConfig

CFG = ArchConfig("llama", 256, 64, 96, 1, 4, 2, 16, 1e4, 1e-5, "swiglu", True, False, 256)
XPUC = [sys.executable, "-m", "xpuc.compiler.cli"]


def _graph(path: Path, cfg: ArchConfig = CFG, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    w = {n: (rng.standard_normal(s) * 0.1).astype(np.float32) for n, s in cfg.weight_shapes().items()
         if not n.startswith(("embed", "final"))}
    return decoder_prefill_onnx(path, cfg, w)


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """A tiny decoder graph and a database with its two FFN matmuls tuned at 16 tokens (4 trials each)."""
    d = tmp_path_factory.mktemp("tune")
    onnx_path = _graph(d / "dec.onnx")
    db = d / "db"
    r = subprocess.run([*XPUC, "tune", str(onnx_path), "--db", str(db), "--trials", "4", "--trials-per-iter", "4",
                        "--buckets", "16", "--only", "fused_matmul", "--json", "--quiet"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    return d, onnx_path, db, json.loads(r.stdout)


def test_tune_records_every_trial_and_beats_nothing_silently(tuned):
    _, _, db, report = tuned
    assert report["workloads"], report
    for w in report["workloads"]:
        assert w["trials"] == 4 and w["new"] == 4
        assert w["best_us"] is not None and w["best_us"] > 0
        assert w["default_us"] is not None and w["default_us"] > 0
    index = json.loads((db / "xpuc-tuning.json").read_text())
    assert index["schema"] == 1 and index["target"]["kind"] == "llvm"
    assert {w["bucket"] for w in index["workloads"].values()} == {16}
    records = (db / "database_tuning_record.json").read_text().splitlines()
    assert len(records) == 4 * len(report["workloads"])


def test_rerun_resumes_instead_of_retuning(tuned):
    _, onnx_path, db, first = tuned
    r = subprocess.run([*XPUC, "tune", str(onnx_path), "--db", str(db), "--trials", "4", "--buckets", "16",
                        "--only", "fused_matmul", "--json", "--quiet"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    again = json.loads(r.stdout)
    assert [w["new"] for w in again["workloads"]] == [0] * len(first["workloads"])
    assert [w["best_us"] for w in again["workloads"]] == [w["best_us"] for w in first["workloads"]]


def test_compile_with_database_uses_tuned_kernels_and_matches_onnxruntime(tuned, capsys):
    import onnxruntime as ort

    from xpuc.runtime.graph import GraphRunner

    d, onnx_path, db, report = tuned
    art = d / "art"
    assert cli(["compile", str(onnx_path), "-o", str(art), "--tuning-db", str(db), "--force"]) == 0
    err = capsys.readouterr().err
    assert "kernels from the tuning database" in err and "older default schedule" not in err
    manifest = json.loads((art / "manifest.json").read_text())
    assert manifest["io"]["buckets"] == [16]
    info = manifest["modules"][0]["info"]
    # each tuned kernel comes from the database unless its default schedule measured faster than every record
    faster_default = sum(w["default_us"] <= w["best_us"] for w in report["workloads"])
    assert info["kept_default_schedule"] == faster_default
    assert info["tuned_kernels"] + info["kept_default_schedule"] == len(report["workloads"])
    runner = GraphRunner(art)
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(1)
    for n, fn in ((16, "main_seq16"), (7, "main")):
        x = rng.standard_normal((1, n, 64)).astype(np.float32)
        cos, sin = rope_tables(n, 16, 1e4)
        feeds = {"x": x, "cos": cos, "sin": sin, "mask": causal_mask(n)}
        y = runner(*feeds.values())[0]
        assert runner.last_function == fn
        np.testing.assert_allclose(y, sess.run(None, feeds)[0], rtol=1e-4, atol=1e-4)


def test_default_schedule_kept_where_it_measured_faster_and_stale_defaults_warned(tuned, tmp_path, capsys):
    from xpuc.compiler.pipeline import DEFAULT_CPU_SCHEDULE

    d, onnx_path, db, report = tuned
    copy = tmp_path / "db"
    shutil.copytree(db, copy)
    index = json.loads((copy / "xpuc-tuning.json").read_text())
    for w in index["workloads"].values():
        assert w["default_schedule"] == DEFAULT_CPU_SCHEDULE
        w["default_us"] = w["best_us"] / 2  # the default "measured" twice as fast as the best record
    (copy / "xpuc-tuning.json").write_text(json.dumps(index))
    assert cli(["compile", str(onnx_path), "-o", str(tmp_path / "a"), "--tuning-db", str(copy)]) == 0
    err = capsys.readouterr().err
    assert "0 of " in err and f"{len(report['workloads'])} kept the default schedule (measured faster)" in err
    info = json.loads((tmp_path / "a" / "manifest.json").read_text())["modules"][0]["info"]
    assert info["tuned_kernels"] == 0 and info["kept_default_schedule"] == len(report["workloads"])
    for w in index["workloads"].values():
        w["default_schedule"] = "0"  # measured against an older default schedule
    (copy / "xpuc-tuning.json").write_text(json.dumps(index))
    assert cli(["compile", str(onnx_path), "-o", str(tmp_path / "b"), "--tuning-db", str(copy)]) == 0
    err = capsys.readouterr().err
    assert "older default schedule" in err and f"{len(report['workloads'])} of " in err
    # a rerun of the tuning job re-measures the stale defaults (and adds no trials)
    r = subprocess.run([*XPUC, "tune", str(onnx_path), "--db", str(copy), "--trials", "4", "--buckets", "16",
                        "--only", "fused_matmul", "--json", "--quiet"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    again = json.loads((copy / "xpuc-tuning.json").read_text())
    assert all(w["default_schedule"] == DEFAULT_CPU_SCHEDULE for w in again["workloads"].values())
    assert [w["new"] for w in json.loads(r.stdout)["workloads"]] == [0] * len(report["workloads"])


def test_database_of_another_model_or_target_is_refused(tuned, tmp_path, capsys):
    import dataclasses

    _, _, db, _ = tuned
    other = _graph(tmp_path / "other.onnx", dataclasses.replace(CFG, hidden_size=32, head_dim=8))
    assert cli(["compile", str(other), "-o", str(tmp_path / "a"), "--tuning-db", str(db)]) == 2
    assert "covers none of the" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()
    assert cli(["compile", str(other), "-o", str(tmp_path / "b"), "--device", "oneplus-12", "--prefill-on", "cpu",
                "--tuning-db", str(db)]) == 2
    assert "was tuned for llvm" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


def test_corrupted_records_are_named_and_half_lines_dropped(tuned, tmp_path, capsys):
    _, onnx_path, db, _ = tuned
    bad = tmp_path / "db"
    shutil.copytree(db, bad)
    rec = bad / "database_tuning_record.json"
    lines = rec.read_text().splitlines(keepends=True)
    rec.write_text("".join(lines[:1] + ["{not json\n"] + lines[1:]))
    assert cli(["compile", str(onnx_path), "-o", str(tmp_path / "a"), "--tuning-db", str(bad)]) == 2
    assert "line 2 is not a valid tuning record" in capsys.readouterr().err
    # a record cut off by a kill mid-write is dropped with a warning; the complete ones are kept
    rec.write_text("".join(lines) + lines[0][: len(lines[0]) // 2])
    assert cli(["inspect", str(bad)]) == 0
    out = capsys.readouterr()
    assert "half-written" in out.err and f"{len(lines)} records" in out.out
    assert rec.read_text() == "".join(lines)


def test_merge_unions_records_and_refuses_mixed_targets(tuned, tmp_path, capsys):
    _, onnx_path, db, report = tuned
    db2 = tmp_path / "db2"
    assert cli(["tune", str(onnx_path), "--db", str(db2), "--trials", "2", "--trials-per-iter", "2",
                "--buckets", "8", "--only", "fused_matmul", "--quiet"]) == 0
    merged = tmp_path / "merged"
    assert cli(["tune", "merge", str(db), str(db2), "-o", str(merged)]) == 0
    index = json.loads((merged / "xpuc-tuning.json").read_text())
    assert {w["bucket"] for w in index["workloads"].values()} == {8, 16}
    n = sum(len((p / "database_tuning_record.json").read_text().splitlines()) for p in (db, db2))
    assert len((merged / "database_tuning_record.json").read_text().splitlines()) == n
    assert cli(["tune", "merge", str(db), str(db2), "-o", str(merged)]) == 2  # never overwrites
    foreign = tmp_path / "foreign"
    shutil.copytree(db2, foreign)
    idx = json.loads((foreign / "xpuc-tuning.json").read_text())
    idx["target"]["mtriple"] = "aarch64-linux-gnu"
    (foreign / "xpuc-tuning.json").write_text(json.dumps(idx))
    assert cli(["tune", "merge", str(db), str(foreign), "-o", str(tmp_path / "m2")]) == 2
    assert "different targets" in capsys.readouterr().err
    assert not (tmp_path / "m2").exists()


def test_interrupt_keeps_records_and_rerun_resumes(tmp_path):
    onnx_path = _graph(tmp_path / "dec.onnx")
    db = tmp_path / "db"
    cmd = [*XPUC, "tune", str(onnx_path), "--db", str(db), "--trials", "40", "--trials-per-iter", "2",
           "--buckets", "16", "--only", "sigmoid", "--quiet"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    rec = db / "database_tuning_record.json"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and not (rec.exists() and len(rec.read_text().splitlines()) >= 2):
        time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    _out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-1500:]
    assert "rerun the same command to resume" in err
    kept = len(rec.read_text().splitlines())
    assert 2 <= kept < 40
    index = json.loads((db / "xpuc-tuning.json").read_text())
    assert sum(w["trials"] for w in index["workloads"].values()) == kept
    r = subprocess.run([*XPUC, "tune", str(onnx_path), "--db", str(db), "--trials", str(kept + 2),
                        "--trials-per-iter", "2", "--buckets", "16", "--only", "sigmoid", "--json", "--quiet"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-1500:]
    rows = json.loads(r.stdout)["workloads"]
    assert sum(w["new"] for w in rows) == 2 and sum(w["trials"] for w in rows) == kept + 2


def test_bad_arguments_are_one_line_errors(tmp_path, capsys):
    onnx_path = _graph(tmp_path / "dec.onnx")
    assert cli(["tune", str(onnx_path), "--db", str(tmp_path / "db"), "--buckets", "a,b"]) == 2
    assert cli(["tune", str(onnx_path), "--db", str(tmp_path / "db"), "--device", "oneplus-12"]) == 2
    assert "--rpc-tracker" in capsys.readouterr().err
    assert cli(["compile", str(onnx_path), "-o", str(tmp_path / "a"), "--tuning-db", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err


# --- device farms over RPC (loopback only; every test stops its processes) --------------------------------------

def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_tracker_that_does_not_answer_and_unknown_key(tmp_path, capsys):
    from xpuc.compiler.tuning.rpc import start_tracker

    onnx_path = _graph(tmp_path / "dec.onnx")
    port = _free_port()
    t0 = time.monotonic()
    assert cli(["tune", str(onnx_path), "--db", str(tmp_path / "db"), "--rpc-tracker", f"127.0.0.1:{port}",
                "--rpc-timeout", "3"]) == 2
    assert "does not answer" in capsys.readouterr().err and time.monotonic() - t0 < 30
    with start_tracker(port=_free_port()) as tracker:
        host, port = tracker.address
        assert cli(["tune", str(onnx_path), "--db", str(tmp_path / "db"), "--rpc-tracker", f"{host}:{port}",
                    "--rpc-key", "nobody", "--rpc-timeout", "3"]) == 2
        assert "no device is registered under key 'nobody'" in capsys.readouterr().err
    assert tracker.proc.poll() is not None


def test_tune_through_tracker_on_x86_server(tmp_path):
    from xpuc.compiler.tuning.rpc import start_server, start_tracker

    onnx_path = _graph(tmp_path / "dec.onnx")
    with start_tracker(port=_free_port()) as tracker, \
            start_server(tracker.address, "x86", port=_free_port()):
        host, port = tracker.address
        r = subprocess.run([*XPUC, "tune", str(onnx_path), "--db", str(tmp_path / "db"), "--trials", "2",
                            "--trials-per-iter", "2", "--buckets", "16", "--only", "sigmoid",
                            "--rpc-tracker", f"{host}:{port}", "--rpc-key", "x86", "--json", "--quiet"],
                           capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.loads(r.stdout)["workloads"]
    assert rows and all(w["new"] == 2 and w["best_us"] for w in rows)


def test_tune_for_aarch64_on_an_emulated_server(tmp_path):
    """The plumbing end to end for an ARM device: cross-built candidates measured under QEMU via the tracker.
    (Timings under emulation are meaningless; the records and the database are what is checked.)"""
    from xpuc.compiler.tuning.rpc import start_emulated_server, start_tracker
    from xpuc.targets.qemu import missing_host_tools

    if missing_host_tools():
        pytest.skip(f"needs {', '.join(missing_host_tools())} (installed by .ci/system-deps)")
    onnx_path = _graph(tmp_path / "dec.onnx")
    with start_tracker(port=_free_port()) as tracker, \
            start_emulated_server(tracker.address, "arm", port=_free_port()):
        host, port = tracker.address
        r = subprocess.run([*XPUC, "tune", str(onnx_path), "--device", "linux-arm64", "--db", str(tmp_path / "db"),
                            "--trials", "2", "--trials-per-iter", "2", "--buckets", "16", "--only", "sigmoid",
                            "--rpc-tracker", f"{host}:{port}", "--rpc-key", "arm", "--rpc-timeout", "120", "--json",
                            "--quiet"], capture_output=True, text=True, timeout=540)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.loads(r.stdout)["workloads"]
    assert rows and all(w["new"] == 2 and w["best_us"] for w in rows)
    index = json.loads((tmp_path / "db" / "xpuc-tuning.json").read_text())
    assert index["target"]["mtriple"] == "aarch64-linux-gnu"
    recs = [json.loads(line) for line in (tmp_path / "db" / "database_tuning_record.json").read_text().splitlines()]
    assert len(recs) == 2 and all("aarch64" in json.dumps(r) for r in recs)


# --- sparse kernels' knobs (XGBoost-guided measured search) -----------------------------------------------------

def test_sparse_search_is_guided_by_the_cost_model():
    """On a known cost surface the guided search reaches the optimum well before trying every configuration."""
    from xpuc.compiler.tuning.sparse_tuning import candidate_knobs, tune_sparse

    def cost(kind, d_model, d_ff, dtype, sparsity, k):
        return 1e-6 * ((k.cluster - 32) ** 2 / 64 + 4 * abs(k.threads - 2) + (3 if k.mode == "split" else 0)
                       + 10 * (1 - sparsity) + 1)

    space = len(candidate_knobs(4096, 8, True))
    recs = tune_sparse("swiglu", 1024, 4096, "q4_0", (0.9,), trials=12, init=4, max_threads=8, progress=False,
                       measure_fn=cost)
    assert len(recs) == 12 < space
    best = min(recs, key=lambda r: r.us)
    assert (best.cluster, best.threads, best.mode) == (32, 2, "fused")
    assert all(r.predicted_us is None for r in recs[:4]) and all(r.predicted_us for r in recs[4:])


def test_tune_sparse_measures_real_kernels_and_resumes(tmp_path, capsys):
    from support.models import random_weights, tiny_config

    from xpuc.compiler.model_writer import write_hf_dir

    cfg = tiny_config(ffn_kind="drelu")
    model = write_hf_dir(tmp_path / "m", cfg, random_weights(cfg))
    db = tmp_path / "db"
    assert cli(["tune", str(model), "--sparse", "--db", str(db), "--trials", "5", "--sparsity", "0.9,0.5",
                "--json", "--quiet"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["new"]) == 5 and all(r["us"] > 0 for r in out["new"])
    assert {b["sparsity"] for b in out["best"]} <= {0.5, 0.9} and out["best"]
    assert cli(["tune", str(model), "--sparse", "--db", str(db), "--trials", "7", "--sparsity", "0.9,0.5",
                "--json", "--quiet"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert len(again["new"]) == 2
    seen = {(r["cluster"], r["threads"], r["mode"], r["sparsity"]) for r in out["new"]}
    assert not seen & {(r["cluster"], r["threads"], r["mode"], r["sparsity"]) for r in again["new"]}
    index = json.loads((db / "xpuc-tuning.json").read_text())
    assert len(index["sparse"]) == 7
    assert cli(["tune", str(model), "--sparse", "--db", str(db), "--sparsity", "1.5"]) == 2

    # xpuc plan takes the cluster size of the fastest record nearest the profiled sparsity
    from xpuc.compiler.frontends import load_model
    from xpuc.compiler.tuning.sparse_tuning import best_records
    from xpuc.runtime.formats.profile_stats import ProfileStats

    freq = np.full((cfg.num_layers, cfg.intermediate_size), 0.1)
    fingerprint = load_model(model, with_tokenizer=False).fingerprint()
    stats = ProfileStats(cfg.to_dict(), fingerprint, 100, None, [0.0] * cfg.num_layers, freq.tolist())
    stats.save(tmp_path / "stats.json")
    best = min((b for b in best_records(index["sparse"]) if b["dtype"] == "q4_0"),
               key=lambda b: abs(b["sparsity"] - 0.9))
    want = best["cluster"]
    capsys.readouterr()
    assert cli(["plan", str(model), "--stats", str(tmp_path / "stats.json"), "--device", "host", "--memory-budget",
                "64MiB", "--tuning-db", str(db), "-o", str(tmp_path / "plan.json")]) == 0
    assert f"cluster size {want}, {best['threads']} compute threads, {best['mode']} kernel:" in capsys.readouterr().out
    plan = json.loads((tmp_path / "plan.json").read_text())
    # the runtime builds its kernels with the tuned thread count and runs the tuned kernel form
    assert (plan["cluster"], plan["compute_threads"], plan["ffn_kernel"]) == (want, best["threads"], best["mode"])
    assert cli(["plan", str(model), "--stats", str(tmp_path / "stats.json"), "--device", "oneplus-12",
                "--memory-budget", "64MiB", "--tuning-db", str(db), "-o", str(tmp_path / "p2.json")]) == 2


def test_tune_an_image_graph_with_symbolic_dims_fixed_as_compile_fixes_them(tmp_path):
    """`--input-shape` fixes the dims as for `xpuc compile`; a kernel without a sequence axis is tuned once, not once
    per bucket."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array((rng.standard_normal((8, 3, 3, 3)) * 0.1).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["y"], ["z"])],
        "img", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, "H", "W"])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, None)], [w])
    path = tmp_path / "img.onnx"
    import onnx

    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    db = tmp_path / "db"
    r = subprocess.run([*XPUC, "tune", str(path), "--input-shape", "x=1,3,16,32", "--db", str(db), "--trials", "2",
                        "--trials-per-iter", "2", "--buckets", "16,64", "--json", "--quiet"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    names = [w["workload"] for w in json.loads(r.stdout)["workloads"]]
    assert names and all(n.endswith("@16") for n in names), names  # the same kernels at 64: not tuned again
    assert len(set(names)) == len(names)
    r = subprocess.run([*XPUC, "tune", str(path), "--input-shape", "x=1,3,16", "--db", str(db)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stderr.count("xpuc: error:") == 1 and "Traceback" not in r.stderr, r.stderr
