"""``xpuc perplexity`` (llama-perplexity's method) and ``xpuc bench`` of a compiled model (llama-bench's tests)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from support.cli import assert_clean_error, xpuc
from support.models import reference_chunk_nll

from xpuc.compiler.compiled_bench import bench_session
from xpuc.compiler.frontends import load_model
from xpuc.compiler.reference import ReferenceModel
from xpuc.runtime.errors import XpucError
from xpuc.runtime.perplexity import perplexity
from xpuc.runtime.tokenizer import XpucTokenizer

TEXT = "/usr/share/common-licenses/Apache-2.0"


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> tuple[Path, Path]:
    from support.models import random_weights, tiny_config, tiny_tokenizer

    from xpuc.compiler.model_writer import write_gguf

    d = tmp_path_factory.mktemp("measure")
    cfg = tiny_config()
    model = write_gguf(d / "tiny.gguf", cfg, random_weights(cfg, 5), "Q8_0", tiny_tokenizer())
    r = xpuc("compile", str(model), "-o", str(d / "art"), "--device", "host", "--quiet", "--dot", "float32")
    assert r.returncode == 0, r.stderr
    return model, d / "art"


class _Echo:
    """A session whose logits after token t put log-probability log(0.5) on (t + 1) % V and spread the rest."""

    V = 8
    max_context = 64

    def reset(self):
        self.fed = []

    def _logits(self, t: int) -> np.ndarray:
        z = np.full(self.V, np.log(0.5 / (self.V - 1)))
        z[(t + 1) % self.V] = np.log(0.5)
        return z

    def prefill(self, ids):
        self.fed += list(ids)
        return self._logits(ids[-1])

    def decode(self, t):
        self.fed.append(t)
        return self._logits(t)


def test_scored_positions_are_the_second_half_of_each_chunk():
    """Chunks of 8: positions 4..6 predict tokens 5..7 (3 per chunk); the first token becomes BOS."""
    s = _Echo()
    tokens = [1, 2, 3, 4, 5, 6, 7, 0, 3, 4, 5, 6, 0, 0, 0, 0, 9]  # two whole chunks, the tail is dropped
    r = perplexity(s, tokens, 8, bos=7)
    # chunk 1: 5->6, 6->7, 7->0 follow the +1 rule (p = 0.5); chunk 2: 6->0, 0->0, 0->0 do not (p = 0.5 / 7)
    want = np.array([np.log(2)] * 3 + [np.log(14)] * 3)
    assert r.tokens_scored == 6 and r.chunks == 2 and r.ctx == 8
    assert r.ppl == pytest.approx(np.exp(want.mean()))
    assert r.stderr == pytest.approx(r.ppl * np.sqrt(want.var() / 5))
    assert s.fed == [7, 4, 5, 6, 0, 0, 0]  # the second chunk as fed: BOS first, the last token never fed


def test_compiled_model_perplexity_equals_the_numpy_reference(compiled):
    model, art = compiled
    r = xpuc("perplexity", str(art), "--text", TEXT, "--ctx", "32", "--chunks", "3", "--json")
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    tok = XpucTokenizer.from_artifact_dir(art)
    ids = tok.encode(Path(TEXT).read_text(), add_bos=False)
    ref = ReferenceModel(load_model(model), "float32")
    nll = reference_chunk_nll(ref, ids, 32, 3, tok.bos_token_id if tok.add_bos else None)
    assert got["tokens_scored"] == 3 * 15 and got["chunks"] == 3
    assert got["ppl"] == pytest.approx(float(np.exp(np.mean(nll))), rel=2e-3)


def test_perplexity_bad_input(compiled, tmp_path):
    _, art = compiled
    (tmp_path / "short.txt").write_text("hello world")
    run = ("perplexity", str(art), "--ctx", "32", "--text")
    assert_clean_error(xpuc(*run, str(tmp_path / "short.txt")), "fewer than one chunk")
    assert_clean_error(xpuc(*run, str(tmp_path / "none.txt")), "cannot read the text")
    assert_clean_error(xpuc("perplexity", str(art), "--text", TEXT), "exceeds the model's context length of 256")
    with pytest.raises(XpucError, match="at least 4"):
        perplexity(_Echo(), list(range(20)), 3)


def test_bench_compiled_model_prints_llama_bench_tests(compiled, tmp_path):
    _, art = compiled
    r = xpuc("bench", str(art), "-p", "16", "-n", "8", "-r", "2", "-o", str(tmp_path / "b.json"), "--quiet")
    assert r.returncode == 0, r.stderr
    rows = [ln for ln in r.stdout.splitlines() if ln.startswith("| art |")]
    assert [ln.split("|")[6].strip() for ln in rows] == ["pp16", "tg8"]
    report = json.loads((tmp_path / "b.json").read_text())
    for t in report["tests"]:
        assert len(t["t_s"]) == 2 and all(v > 0 for v in t["t_s"]) and t["avg_ts"] > 0
    assert_clean_error(xpuc("bench", str(art), "-p", "0", "-n", "0"), "nothing to measure")
    r = xpuc("bench", str(art), "-p", "8", "-n", "4", "-d", "20", "-r", "1", "--quiet")
    assert r.returncode == 0, r.stderr
    assert [ln.split("|")[6].strip() for ln in r.stdout.splitlines() if ln.startswith("| art |")] == [
        "pp8 @ d20", "tg4 @ d20"]


class _Counting:
    """A session that records how many tokens each run put in its cache before being reset."""

    def __init__(self) -> None:
        self.position, self.runs = 0, []

    def reset(self) -> None:
        if self.position:
            self.runs.append(self.position)
        self.position = 0

    def prefill(self, ids) -> None:
        self.position += len(ids)

    def decode(self, token) -> None:
        self.position += 1


def test_bench_depth_fills_the_cache_before_each_timed_run():
    s = _Counting()
    tests = bench_session(s, 100, n_prompt=8, n_gen=4, repetitions=2, depth=20)
    s.reset()
    assert [t.test for t in tests] == ["pp8 @ d20", "tg4 @ d20"]
    assert s.runs == [28, 28, 28, 24, 24, 24]  # warm-up + 2 runs each: the depth, then the test's tokens
