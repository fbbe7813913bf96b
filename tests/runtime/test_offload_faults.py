"""Packed models as untrusted input and the CLI around them: damaged files, read faults, altered manifests,
statistics of another model, Ctrl-C, the runtime library alone, a phone build refused here."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
from support.cli import assert_clean_error, xpuc

from xpuc.compiler.synth import synthesize
from xpuc.runtime.artifact import seal_manifest
from xpuc.runtime.errors import XpucError


def _copy_art(d, tmp_path):
    art = tmp_path / "art"
    shutil.copytree(d / "art", art)
    return art


def test_truncated_flash_file_is_a_clear_error(packed, tmp_path):
    from xpuc.runtime.offload import OffloadModel

    art = _copy_art(packed[0], tmp_path)
    with open(art / "ffn.bin", "r+b") as f:
        f.truncate(os.path.getsize(art / "ffn.bin") - 4096)
    with pytest.raises(XpucError, match="truncated"):
        OffloadModel(art, "full", 0.4)


def test_corrupted_record_fails_its_checksum(packed, tmp_path):
    from xpuc.runtime.formats.flash import FlashLayout
    from xpuc.runtime.offload import OffloadModel

    art = _copy_art(packed[0], tmp_path)
    fl = FlashLayout.load(art / "flash.json")
    rb = fl.part_bytes[0]  # a whole record, or a split record's gate part
    with open(art / "ffn.bin", "r+b") as f:  # flip bytes in every cold cluster of layer 0
        for j in range(fl.n_clusters // 2, fl.n_clusters):
            f.seek(fl.part_base(0, 0) + j * rb + rb // 2)
            f.write(b"\xff\xff\xff\xff")
    with OffloadModel(art, "naive") as m, pytest.raises(XpucError, match="checksum|corrupt"):
        m.reader.read(np.array([fl.part_base(0, 0) + (fl.n_clusters - 1) * rb]), [m._pool_bytes[0, :rb]],
                      m.crcs[0, fl.n_clusters - 1:, 0], rb)


@pytest.mark.parametrize("mode", ["naive", "full"])
def test_corrupted_records_fail_their_checksum_while_decoding(packed, tmp_path, mode):
    """Every record part the runtime reads is checked: naive mode's streamed layers (both parts of split
    records) and full mode's misses; for split records the up/down part, read apart from the gate row and only
    for neurons that fired, has its own checksum."""
    from xpuc.runtime.formats.flash import FlashLayout
    from xpuc.runtime.offload import OffloadModel

    art = _copy_art(packed[0], tmp_path)
    fl = FlashLayout.load(art / "flash.json")
    last = len(fl.part_bytes) - 1  # split: the up/down part; whole records: the record
    pb = fl.part_bytes[last]
    with OffloadModel(art, mode, 0.3) as m:
        with open(art / "ffn.bin", "r+b") as f:  # after loading: every cold record, every layer
            for i in range(len(fl.layers)):
                for j in range(m.cache.layers[i].n_hot if m.cache else 0, fl.n_clusters):
                    f.seek(fl.part_base(i, last) + j * pb + pb - 8)
                    f.write(b"\x5a" * 4)
        with pytest.raises(XpucError, match="checksum|corrupt"):
            for t in range(40):  # until a cold neuron fires
                m.decode(t)


def test_read_errors_and_short_reads_surface_cleanly(packed):
    from xpuc.runtime.offload import OffloadModel

    d, _ = packed
    with OffloadModel(d / "art", "full", 0.3) as m:
        def failing(bufs, offset):
            raise OSError(5, "Input/output error")

        m.reader._preadv = failing
        with pytest.raises(XpucError, match="read error"):
            for t in range(40):  # until a miss has to be read
                m.decode(t)
    with OffloadModel(d / "art", "cache", 0.3) as m:
        m.reader._preadv = lambda bufs, offset: 17
        with pytest.raises(XpucError, match="short read"):
            for t in range(40):
                m.decode(t)


def test_bad_artifacts_and_arguments(packed, tmp_path):
    d, _ = packed
    assert_clean_error(xpuc("bench", str(tmp_path), "--tokens", "4"), "not an xpuc artifact")
    assert_clean_error(xpuc("bench", str(d / "art"), "--modes", "naive,turbo"), "unknown mode")
    assert_clean_error(xpuc("bench", str(d / "art"), "--budget", "0%"), "budget")
    art = _copy_art(d, tmp_path)
    (art / "plan.json").write_text((art / "plan.json").read_text() + "\n")  # altered after packing
    assert_clean_error(xpuc("bench", str(art), "--tokens", "4"), "fails its checksum")


def test_pack_refuses_a_predictor_whose_units_have_different_ranks(packed, tmp_path):
    """The decode module compiles one predict function, so a predictor file whose units differ in rank (made
    elsewhere, or by an older trainer) is one clean error at pack time, not a shape failure while decoding."""
    from xpuc.runtime.formats.predictor import Predictor

    d, _ = packed
    pred = Predictor.load(d / "pred.safetensors")
    lp = pred.layers[1]
    lp.w1, lp.b1, lp.w2 = lp.w1[:-2], lp.b1[:-2], lp.w2[:, :-2]
    pred.save(tmp_path / "mixed.safetensors")
    r = xpuc("pack", str(d / "model"), "--stats", str(d / "stats.json"), "--plan", str(d / "plan.json"),
             "--predictor", str(tmp_path / "mixed.safetensors"), "-o", str(tmp_path / "out"))
    assert_clean_error(r, "different ranks")
    assert not (tmp_path / "out").exists()


def test_xpuc_run_on_packed_model_and_ctrl_c(packed):
    import json
    import signal
    import subprocess
    import time

    from support.cli import XPUC

    d, _ = packed
    r = xpuc("run", str(d / "art"), "--prompt", "flash", "--max-tokens", "6", "--json", "--budget", "40%")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["generated_tokens"] == 6 and rep["mode"] == "full" and rep["accounted_mib"] > 0
    assert_clean_error(xpuc("run", str(d / "art"), "--prompt", "x", "--mode", "fast"), "unknown mode")
    # stdout to /dev/null: a pipe nobody reads fills up and blocks the generator; SIGINT restored to its
    # default in the child in case the test runner was started with it ignored (a background job)
    p = subprocess.Popen([*XPUC, "run", str(d / "art"), "--prompt", "a", "--max-tokens", "1000",
                          "--budget", "40%"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        seen = []
        for line in p.stderr:  # "… generating" is printed once the prompt is prefilled and decoding starts
            seen.append(line)
            if "generating" in line:
                break
        assert seen and "generating" in seen[-1], seen
        time.sleep(0.3)
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()
    assert p.returncode == 130 and "interrupted" in err and "Traceback" not in err, (p.returncode, err[-2000:])


def test_inspect_packed_model(packed):
    import json

    d, spec = packed
    r = xpuc("inspect", str(d / "art"), "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["kind"] == "packed" and info["layers"] == spec.config.num_layers
    assert info["weight_dtype"] == "float16" and len(info["predictor_ranks"]) == spec.config.num_layers


RUNTIME_ONLY_SCRIPT = r"""
import ctypes, os, sys
real_init = ctypes.CDLL.__init__
def guarded(self, name, *a, **k):
    if name and ("tvm_compiler" in str(name) or os.path.basename(str(name)) == "libtvm.so"):
        raise OSError("the compiler library must not be loaded by the runtime")
    real_init(self, name, *a, **k)
ctypes.CDLL.__init__ = guarded
import numpy as np
from xpuc.runtime.offload import OffloadModel
with OffloadModel(sys.argv[1], "full", 0.4, threads=2) as m:
    toks, _ = m.generate([5, 77, 300, 12], 6)
maps = open("/proc/self/maps").read()
assert "libtvm_runtime" in maps and "libtvm_compiler" not in maps, "compiler library mapped"
assert "tvm.relax.transform" not in sys.modules
above = sorted(m for m in sys.modules if m.startswith(("xpuc.compiler", "xpuc.schedules", "xpuc.targets")))
assert not above, f"the runtime imported {above}"
print(",".join(map(str, toks)))
"""


def test_packed_model_runs_with_the_runtime_library_only(packed):
    """The packed model's modules were compiled ahead of time: a process that cannot load TVM's compiler
    library, and imports nothing of xpuc but its runtime, runs it and produces the tokens of an in-process run."""
    import subprocess
    import sys

    from xpuc.runtime.offload import OffloadModel

    d, _ = packed
    env = {**os.environ, "TVM_USE_RUNTIME_LIB": "1"}
    r = subprocess.run([sys.executable, "-c", RUNTIME_ONLY_SCRIPT, str(d / "art")], capture_output=True, text=True,
                       env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    with OffloadModel(d / "art", "full", 0.4, threads=2) as m:
        want, _ = m.generate([5, 77, 300, 12], 6)
    assert r.stdout.strip().splitlines()[-1] == ",".join(map(str, want))


@pytest.mark.arm
def test_pack_for_a_phone_cross_links_android_libraries_and_is_refused_here(packed, tmp_path):
    """`xpuc pack --device oneplus-12`: both modules are AArch64 Android shared objects (no glibc symbol
    versions, NEON code, only TVM runtime / libc / libm left undefined); this x86 host refuses to run them in one
    line, before reading a weight, and `inspect` still describes them."""
    from xpuc.targets.arm_build import inspect_elf

    if shutil.which("clang") is None or shutil.which("ld.lld") is None:
        if os.environ.get("CI"):
            pytest.fail("CI must provide clang and lld (.ci/system-deps installs them)")
        pytest.skip("clang / lld missing")
    d, _ = packed
    r = xpuc("pack", str(d / "model"), "--stats", str(d / "stats.json"), "--plan", str(d / "plan.json"),
             "--predictor", str(d / "pred.safetensors"), "--device", "oneplus-12", "-o", str(tmp_path / "phone"))
    assert r.returncode == 0, r.stderr
    allowed = {"TVMFFIErrorSetRaisedFromCStrParts", "memcpy", "memset", "cosf", "sinf", "expf", "exp2f", "log2f",
               "powf", "tanhf", "sqrtf", "logf"}
    for lib in ("decode.so", "ffn.so"):
        rep = inspect_elf(tmp_path / "phone" / lib)
        assert rep.machine == "AArch64" and not rep.glibc_versions and rep.neon_fp_ops > 0
        assert rep.exported_ffi and set(rep.undefined) <= allowed, rep.undefined
    if not os.uname().machine.startswith("aarch64"):
        assert_clean_error(xpuc("run", str(tmp_path / "phone"), "--prompt", "hi"), "compiled for aarch64-linux-android")
    shown = xpuc("inspect", str(tmp_path / "phone"))
    assert shown.returncode == 0 and "aarch64-linux-android" in shown.stdout


@pytest.mark.parametrize("packed", [16], indirect=True, ids=["C16-aligned"])  # the manifest checks do not depend on C
@pytest.mark.parametrize("edit", ["versions_list", "config_str", "sample_str", "modules_none", "decode_abs",
                                  "files_empty", "config_missing_key", "not_an_object", "offload_missing_key",
                                  "unknown_field", "kind_other", "threads_str"])
def test_malformed_packed_manifest_is_one_line(packed, tmp_path, edit):
    """Consistent (re-sealed) manifests with wrong types or keys: one line, exit 2, before anything is loaded."""
    import json

    art = _copy_art(packed[0], tmp_path)
    m = json.loads((art / "manifest.json").read_text())
    {"versions_list": lambda: m.update(versions=[1]), "config_str": lambda: m.update(config="x"),
     "sample_str": lambda: m["offload"].update(sample_prompt="ab"), "modules_none": lambda: m.update(modules=None),
     "decode_abs": lambda: m["modules"][0].update(file="/etc/passwd"), "files_empty": lambda: m.update(files={}),
     "config_missing_key": lambda: m["config"].pop("hidden_size"), "not_an_object": lambda: None,
     "offload_missing_key": lambda: m["offload"].pop("ffn_bytes"), "unknown_field": lambda: m.update(extra=1),
     "kind_other": lambda: m.update(kind="rootkit"), "threads_str": lambda: m["modules"][1]["info"].update(threads="2"),
     }[edit]()
    (art / "manifest.json").write_text(json.dumps([m] if edit == "not_an_object" else seal_manifest(m)))
    r = xpuc("run", str(art), "--prompt", "hi", "--max-tokens", "1")
    assert r.returncode == 2 and "Traceback" not in r.stderr and r.stderr.count("xpuc: error:") == 1, r.stderr


@pytest.mark.parametrize("packed", [16], indirect=True, ids=["C16-aligned"])  # the manifest checks do not depend on C
def test_packed_manifest_edited_after_packing_is_refused(packed, tmp_path):
    import json

    art = _copy_art(packed[0], tmp_path)
    m = json.loads((art / "manifest.json").read_text())
    m["config"]["intermediate_size"] += 32  # type-valid, so only the digest can catch it
    (art / "manifest.json").write_text(json.dumps(m))
    assert_clean_error(xpuc("run", str(art), "--prompt", "hi", "--max-tokens", "1"), "altered after it was written")


@pytest.fixture(scope="module")
def other_model(tmp_path_factory):
    """Another generated model with the same config (another seed), with its own profile, predictor and plan."""
    from support.models import profile_predict_plan

    d = tmp_path_factory.mktemp("other")
    synthesize("tiny", 0.9, 4, d / "model")
    spec, _, _ = profile_predict_plan(d, 256, "oneplus-12", 4 << 20, "float16", 16)
    return d, spec


@pytest.mark.parametrize("packed", [16], indirect=True, ids=["C16-aligned"])  # the manifest checks do not depend on C
@pytest.mark.parametrize("part", ["stats", "plan", "predictor"])
def test_pack_refuses_statistics_of_another_model_with_the_same_config(packed, other_model, tmp_path, part):
    """Each of profile, plan and predictor, taken from a model with the same config but other weights, is refused."""
    d, o = packed[0], other_model[0]
    assert other_model[1].config == packed[1].config and other_model[1].fingerprint() != packed[1].fingerprint()
    args = {"stats": o / "stats.json", "plan": o / "plan.json", "predictor": o / "pred.safetensors"}
    args[part] = {"stats": d / "stats.json", "plan": d / "plan.json", "predictor": d / "pred.safetensors"}[part]
    r = xpuc("pack", str(o / "model"), *(f"--{k}={v}" for k, v in args.items()), "-o", str(tmp_path / "art"))
    assert_clean_error(r, "another model")
    assert f"--{part}" in r.stderr
    assert not (tmp_path / "art").exists()


def test_altered_fixed_segment_is_refused_before_decoding(packed, tmp_path):
    """The fixed segment's digest is checked over the bytes read into the kernels' tensors."""
    art = _copy_art(packed[0], tmp_path)
    p = art / "fixed.safetensors"
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0x01
    p.write_bytes(bytes(data))
    assert_clean_error(xpuc("run", str(art), "--prompt", "1 2 3", "--max-tokens", "2"),
                       "fixed.safetensors: fails its checksum")


def test_flash_layout_whose_record_parts_do_not_add_up_is_a_clear_error(packed, tmp_path):
    """A split layout's parts must add up to the record and only clusters of one neuron are split: anything
    else is one clean error when the layout is read, never a wrong offset later."""
    import json

    from xpuc.runtime.formats.flash import FlashLayout

    d = json.loads((packed[0] / "art" / "flash.json").read_text())
    for parts, cluster in (([100, d["cluster_bytes"]], d["cluster"]), ([d["cluster_bytes"], 0], d["cluster"]),
                           ([1, d["cluster_bytes"] - 1], 2)):
        (tmp_path / "flash.json").write_text(json.dumps({**d, "parts": parts, "cluster": cluster}))
        with pytest.raises(XpucError, match="malformed xpuc flash layout"):
            FlashLayout.load(tmp_path / "flash.json")
