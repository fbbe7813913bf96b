"""Mutated inputs never crash the CLI: byte flips, truncations and JSON edits of every kind of file xpuc reads.

Each example copies a small valid input, damages it (hypothesis chooses how), and runs the command that reads it
through ``xpuc.compiler.cli.main``. Allowed outcomes: success (a flipped weight byte is still a model) or exit 2
with exactly one ``xpuc: error:`` line; never an exception escaping main, never a temporary file left behind, never
longer than ``SLOW_S``. ``XPUC_MUTATION_EXAMPLES`` sets the examples per kind (CI: 60 per kind, about 540
cases; ``benchmarks/mutation_soak.py`` runs more).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xpuc.compiler.cli import main

EXAMPLES = int(os.environ.get("XPUC_MUTATION_EXAMPLES", "60"))
SLOW_S = 60.0
TEXT = "the quick brown fox jumps over the lazy dog and the cache keeps hot neurons in memory. " * 20


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """One valid input of each kind: GGUF, Hugging Face directory, compiled artifact, packed model, profile."""
    from support.models import random_weights, tiny_config, tiny_tokenizer

    from xpuc.compiler.build import compile_model
    from xpuc.compiler.model_writer import write_gguf, write_hf_dir
    from xpuc.compiler.synth import synthesize

    d = tmp_path_factory.mktemp("mutation")
    (d / "cal.txt").write_text(TEXT)
    cfg = tiny_config()
    write_gguf(d / "tiny.gguf", cfg, random_weights(cfg, 2), "Q8_0", tiny_tokenizer())
    write_hf_dir(d / "hf", cfg, random_weights(cfg, 2))  # `inspect` reads no tokenizer
    compile_model(d / "tiny.gguf", d / "art", quiet=True)
    synthesize("tiny", 0.9, 1, d / "synth", quiet=True)
    for argv in (["profile", str(d / "synth"), "--text", str(d / "cal.txt"), "--max-tokens", "256",
                  "--predictor", str(d / "pred.safetensors"), "-o", str(d / "profile.json")],
                 ["plan", str(d / "synth"), "--stats", str(d / "profile.json"), "--memory-budget", "4MiB",
                  "--weight-dtype", "float16", "--cluster", "16", "-o", str(d / "plan.json")],
                 ["pack", str(d / "synth"), "--stats", str(d / "profile.json"), "--plan", str(d / "plan.json"),
                  "--predictor", str(d / "pred.safetensors"), "-o", str(d / "packed"), "--quiet"]):
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            assert main(argv) == 0, argv
    return d


def _json_edit(data: bytes, path: list, value, delete: bool) -> bytes:
    """Replace (or delete) the node reached by ``path`` (each index taken modulo its container's size)."""
    doc = json.loads(data)
    node, container, key = doc, None, None
    for p in path:
        if isinstance(node, dict) and node:
            k = sorted(node)[p % len(node)]
        elif isinstance(node, list) and node:
            k = p % len(node)
        else:
            break
        container, key, node = node, k, node[k]
    if container is None:
        return json.dumps(value).encode()
    if delete and isinstance(container, dict):
        del container[key]
    else:
        container[key] = value
    return json.dumps(doc).encode()


JSON_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-2**63, 2**63), st.floats(allow_nan=True),
                        st.text(max_size=8), st.just("../../etc/passwd"), st.just("/etc/passwd"),
                        st.lists(st.integers(-5, 5), max_size=3), st.just({}))

MUTATIONS = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 2**31), st.integers(0, 7)),
    st.tuples(st.just("truncate"), st.floats(0.0, 0.999)),
    st.tuples(st.just("zero_run"), st.integers(0, 2**31), st.integers(1, 64)),
    st.tuples(st.just("json"), st.lists(st.integers(0, 50), min_size=1, max_size=4), JSON_VALUES, st.booleans()),
)


def _mutate(f: Path, m: tuple) -> None:
    data = bytearray(f.read_bytes())
    kind = m[0]
    if kind == "json":
        try:
            f.write_bytes(_json_edit(bytes(data), m[1], m[2], m[3]))
            return
        except (ValueError, UnicodeDecodeError):
            kind, m = "flip", ("flip", m[1][0] * 977, 3)  # not JSON: flip a byte instead
    if kind == "flip" and data:
        data[m[1] % len(data)] ^= 1 << m[2]
    elif kind == "truncate":
        data = data[: int(len(data) * m[1])]
    elif kind == "zero_run" and data:
        i = m[1] % len(data)
        data[i:i + m[2]] = bytes(len(data[i:i + m[2]]))
    f.write_bytes(bytes(data))


# (what is copied, which file in it is damaged, the command that reads it)
CASES = {
    "gguf": ("tiny.gguf", "tiny.gguf", lambda w: ["inspect", str(w / "tiny.gguf")]),
    "gguf_profile": ("tiny.gguf", "tiny.gguf", lambda w: ["profile", str(w / "tiny.gguf"), "--text",
                                                         str(w / "cal.txt"), "--max-tokens", "16", "--sparsity",
                                                         "0.5", "-o", str(w / "out.json")]),
    "safetensors": ("hf", "hf/model.safetensors", lambda w: ["inspect", str(w / "hf")]),
    "hf_config": ("hf", "hf/config.json", lambda w: ["inspect", str(w / "hf")]),
    "manifest": ("art", "art/manifest.json", lambda w: ["run", str(w / "art"), "--prompt", "a b",
                                                       "--max-tokens", "1"]),
    "packed_manifest": ("packed", "packed/manifest.json", lambda w: ["run", str(w / "packed"), "--prompt", "a",
                                                                    "--max-tokens", "1"]),
    "plan_in_packed": ("packed", "packed/plan.json", lambda w: ["run", str(w / "packed"), "--prompt", "a",
                                                                "--max-tokens", "1"]),
    "flash_records": ("packed", "packed/ffn.bin", lambda w: ["run", str(w / "packed"), "--prompt", "a",
                                                             "--max-tokens", "2", "--budget", "50%"]),
    "profile": ("profile.json", "profile.json", lambda w: ["plan", str(w / "synth"), "--stats",
                                                           str(w / "profile.json"), "--memory-budget", "4MiB",
                                                           "-o", str(w / "out.json")]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_mutated_input_is_a_clean_error_or_a_success(inputs, case):
    copied, damaged, argv_of = CASES[case]

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(MUTATIONS)
    def check(mutation):
        with tempfile.TemporaryDirectory() as tmp:
            w = Path(tmp)
            src = inputs / copied
            (shutil.copytree if src.is_dir() else shutil.copy)(src, w / copied)
            shutil.copy(inputs / "cal.txt", w / "cal.txt")
            if case == "profile":
                os.symlink(inputs / "synth", w / "synth")
            _mutate(w / damaged, mutation)
            before = {p.name for p in w.rglob("*")}
            err = io.StringIO()
            t0 = time.monotonic()
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
                try:
                    rc = main(argv_of(w))
                except SystemExit as e:  # argparse
                    rc = e.code
            took = time.monotonic() - t0
            lines = [ln for ln in err.getvalue().splitlines() if ln.startswith("xpuc: error:")]
            assert rc in (0, 2), (mutation, err.getvalue())
            assert rc == 0 or len(lines) == 1, (mutation, err.getvalue())
            assert took < SLOW_S, (mutation, took)
            left = {p.name for p in w.rglob("*")} - before
            assert not {n for n in left if n.endswith((".part", ".tmp"))}, (mutation, left)

    check()
