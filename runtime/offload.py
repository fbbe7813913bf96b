"""Decoding a model whose FFN weights live on flash, over the compiled modules of a packed model.

The math runs in the modules `xpuc pack` compiled ahead of time (``decode.so``: embedding, attention over TVM's
paged KV cache, norms, predictor, MoE router, LM head; ``ffn.so``: the neuron-cluster kernels); this module
loads them with TVM's runtime library and only schedules: cache lookups, reads, calls. Four modes share the
kernels, the flash file and the fixed segment:

``naive``     every token streams each layer's whole FFN from flash (large sequential reads) and runs the
              dense neuron-cluster kernel on it.
``llmflash``  LLM-in-a-flash: the predictor selects clusters, bundled records are read for the ones not in
              memory, memory is managed by a sliding window over the last 5 tokens; reads are synchronous
              and there is no hot segment.
``cache``     + PowerInfer-2's segmented cache: the most frequent clusters are loaded at start and pinned
              (hot segment), the rest of the budget is an LRU cold segment; reads still synchronous.
``full``      + the neuron-cluster pipeline: a layer's misses are read by the I/O threads while the compute
              thread runs the resident clusters, then the arrived ones; the next layer's cold clusters are
              predicted from the hidden state before attention and prefetched while attention runs.

Mixture-of-experts models: every expert is an FFN unit of its own (its flash region, cache segments,
predictor). A layer's compiled router picks the token's experts (Mixtral's top-k softmax); only their units
are predicted, read and computed, and their outputs are weighted parts of the next layer's input.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from xpuc.runtime.errors import XpucError
from xpuc.runtime.flash_reader import FlashReader, aligned_empty
from xpuc.runtime.generation import generate
from xpuc.runtime.offload_ffn import MODES, FFNPaths
from xpuc.runtime.packed import load_packed

PAGE_SIZE = 16
PREFILL_CHUNK = 256  # prompt tokens per prefill call (the KV cache's prefill chunk)
DENSE_PREFILL_MIN_TOKENS = 3  # shorter prompts are stepped through the sparse path (see OffloadModel.prefill)

__all__ = ["MODES", "OffloadModel", "RunMetrics", "TokenMetrics", "DENSE_PREFILL_MIN_TOKENS"]


@dataclass
class TokenMetrics:
    seconds: float
    bytes_read: int
    requests: int
    io_seconds: float
    stall_seconds: float
    fired_bytes: int = 0  # bytes of the records of the neurons whose gate fired (split records only)


@dataclass
class RunMetrics:
    mode: str
    tokens: list[TokenMetrics] = field(default_factory=list)
    prefill_seconds: float = 0.0

    def summary(self) -> dict:
        t = self.tokens
        n = max(len(t), 1)
        sec = sum(m.seconds for m in t)
        io = sum(m.io_seconds for m in t)
        stall = sum(m.stall_seconds for m in t)
        return {"mode": self.mode, "tokens": len(t), "tok_per_s": len(t) / sec if sec else 0.0,
                "ttft_s": self.prefill_seconds, "bytes_read_per_token": sum(m.bytes_read for m in t) / n,
                "requests_per_token": sum(m.requests for m in t) / n,
                "io_hidden": min(1.0, max(0.0, 1.0 - stall / io)) if io > 0 else 1.0,
                "fired_bytes_per_token": sum(m.fired_bytes for m in t) / n}


def _return_freed_memory() -> None:
    """Give the heap's free pages back to the OS (glibc keeps them after large frees; RSS would count them)."""
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


class OffloadModel(FFNPaths):
    """A packed model (``xpuc pack``) ready to decode in one of :data:`MODES`.

    Parameters
    ----------
    artifact:
        Directory written by :func:`xpuc.compiler.offload_pack.pack_offload`.
    mode:
        One of :data:`MODES`.
    ffn_fraction:
        Share of the FFN weights allowed in memory (the rest stays on flash). Default: the plan's budget.
    threads, io_threads:
        Compute threads (validated; the kernels were built for the plan's task count and run on TVM's thread
        pool, sized by ``TVM_NUM_THREADS`` / ``xpuc --threads``), I/O threads of the reader.
    context:
        KV cache length.
    """

    def __init__(self, artifact: str | Path, mode: str = "full", ffn_fraction: float | None = None,
                 threads: int | None = None, io_threads: int | None = None, context: int = 512) -> None:
        import tvm
        from tvm.runtime import ShapeTuple
        from tvm.runtime.vm import VirtualMachine

        if mode not in MODES:
            raise XpucError(f"unknown mode '{mode}' (known: {', '.join(MODES)})")
        if context < 1:
            raise XpucError(f"context must be at least 1 token, got {context}")
        self.mode = mode
        self.art = art = load_packed(Path(artifact))
        self.config = c = art.config
        self.flash = fl = art.flash
        self.plan = art.plan
        self.crcs = art.crcs
        self.threads = threads or self.plan.compute_threads
        if threads is not None and threads < 1:
            raise XpucError(f"threads must be at least 1, got {threads}")
        #: replaces the compiled predictor when set: ``(unit, x) -> sorted cluster ids`` (tests: an oracle mask)
        self.cluster_selector = None
        self.split_kernel = self.plan.ffn_kernel == "split" and fl.bundle_layout(1).gated
        dev = self._dev = tvm.cpu()
        self._tensor, self._view = tvm.runtime.tensor, tvm.runtime.from_dlpack
        self._shape = ShapeTuple
        # the fixed segment is read, and its digest checked, on a thread while the modules load and the hot
        # segments come from flash; none of it is used before the check has passed
        with ThreadPoolExecutor(1, thread_name_prefix="xpuc-fixed") as loader:
            fixed = loader.submit(art.load_fixed, dev)
            self.vm = VirtualMachine(tvm.runtime.load_module(str(art.path / art.modules["decode"])), dev)
            self.ffn_lib = tvm.runtime.load_module(str(art.path / art.modules["ffn"]))
            self.fn = {n: self.vm[n] for n in ("embed", "layer", "layer_predict", "predict", "pre_norm", "head")}
            if c.is_moe:
                self.fn["route"] = self.vm["route"]
            self.kernel = {n: self.ffn_lib[n] for n in (["fused", "dense", "dequant"]
                                                        + (["gate", "updown"] if fl.bundle_layout(1).gated else []))}
            self.context = context
            self.kv = self.vm["create_paged_kv_cache"](ShapeTuple([1]), ShapeTuple([context]),
                                                       ShapeTuple([min(PREFILL_CHUNK, context)]),
                                                       ShapeTuple([PAGE_SIZE]), ShapeTuple([0]))
            self._kv_fn = {n: tvm.get_global_func(f"vm.builtin.kv_state_{n}")
                           for n in ("add_sequence", "remove_sequence", "begin_forward", "end_forward")}
            self._kv_fn["add_sequence"](self.kv, 0)
            self.kv_bytes = 2 * c.num_layers * context * c.num_kv_heads * c.head_dim * 4
            self.pos = 0
            self._stall = 0.0
            self.token_metrics: list[TokenMetrics] = []  # one per decode call since the last reset
            self.reader = FlashReader(art.path / fl.ffn_file, fl.cluster_bytes,
                                      io_threads or self.plan.io_threads, direct=True,
                                      queue_depth=self.plan.queue_depth)
            try:
                if self.reader.size < fl.file_bytes:
                    raise XpucError(f"{art.path / fl.ffn_file}: truncated ({self.reader.size} of {fl.file_bytes} "
                                    "bytes)")
                self._ids = aligned_empty((1, 1), "int32")
                self._ids_t = self._view(self._ids)
                self._setup_ffn(ffn_fraction)
                self._setup_fixed(fixed.result())
                _return_freed_memory()
            except BaseException:
                self.reader.close()
                raise
        self._setup_parts()
        self._setup_resident()

    def _setup_fixed(self, w: dict) -> None:
        """The fixed segment's tensors, by role (each checked to be there; nothing else may be)."""
        c, self.fixed_bytes = self.config, 0

        def t(name: str):
            if name not in w:
                raise XpucError(f"{self.art.path}: fixed.safetensors lacks tensor '{name}'; repack the model")
            a = w.pop(name)
            self.fixed_bytes += int(np.prod(a.shape, dtype=np.int64)) * np.dtype(str(a.dtype)).itemsize
            return a

        self.final_norm, self.embed_table = t("final_norm"), t("embed")
        self.head_table = self.embed_table if c.tie_embeddings else t("lm_head")
        self.layers = []
        for i in range(c.num_layers):
            p = f"layers.{i}."
            attn = [t(p + "attn_norm"), t(p + "qkv"), t(p + "o"), t(p + "ffn_norm")]
            if c.qkv_bias:
                attn.append(t(p + "qkv_bias"))
            self.layers.append({"attn": attn, "ffn_norm": attn[3], "id": self._shape([i]),
                                "router": t(p + "router") if c.is_moe else None})
        self.pred = [[t(f"units.{u}.{k}") for k in ("w1", "b1", "w2", "b2", "thr")] for u in range(c.ffn_units)]
        if w:
            raise XpucError(f"{self.art.path}: fixed.safetensors holds unexpected tensors ({', '.join(sorted(w)[:3])})")

    def _setup_resident(self) -> None:
        """The one-call decode step (``decode_resident``) where it is exact and pays: a dense model, every unit
        wholly in the hot segment and expected to fire in full, and a decode module that has the function
        (packed models built before it have not)."""
        self._resident = None
        fl = self.flash
        if self.cache is None or self.config.is_moe or not bool(np.all(self.always_active)):
            return
        if any(seg.n_hot < fl.n_clusters for seg in self.cache.layers):
            return
        try:
            fn = self.vm["decode_resident"]
        except (AttributeError, KeyError, RuntimeError):  # not in this decode module
            return
        layers = [[*L["attn"][:4], self._thr_t[i], self._tensor(self.cache.hot_slots(i), self._dev), *L["attn"][4:]]
                  for i, L in enumerate(self.layers)]
        self._resident = (fn, layers)

    # --- the FFN output parts handed to the next compiled call -------------------------------------------
    def _setup_parts(self) -> None:
        d, n = self.config.hidden_size, self.max_parts
        self._Y, self._W = aligned_empty((n, d), "float32"), aligned_empty((n,), "float32")
        self._yrow = [self._view(self._Y[j]) for j in range(n)]
        self._ys = [None] + [self._view(self._Y[:m].reshape(m, 1, 1, d)) for m in range(1, n + 1)]
        self._yw = [None] + [self._view(self._W[:m]) for m in range(1, n + 1)]
        self._nparts = 0

    def _new_part(self, weight: float):
        """The next output row of a kernel, contributing ``weight`` times its value."""
        j = self._nparts
        if j >= self.max_parts:
            raise XpucError("internal: more FFN output parts than planned")
        self._W[j] = weight
        self._nparts = j + 1
        return self._yrow[j]

    def _parts(self) -> tuple:
        """(ys, yw) of the parts written since the last call, and start over."""
        m = self._nparts
        if m == 0:
            self._Y[0] = 0.0
            self._W[0] = 0.0
            m = 1
        self._nparts = 0
        return self._ys[m], self._yw[m]

    # --- accounting ----------------------------------------------------------------------------------------
    def accounted_bytes(self) -> dict:
        fixed = self.fixed_bytes + self.kv_bytes + self._Y.nbytes
        ffn = self.scratch.nbytes if self.mode == "naive" else self.cache.nbytes
        staged = self.prefill_staged_bytes()
        io = self.reader.staging_bytes
        return {"fixed": int(fixed), "ffn": int(ffn), "prefill": int(staged), "io": io,
                "total": int(fixed + ffn + staged + io)}

    # --- decoding ------------------------------------------------------------------------------------------
    @property
    def position(self) -> int:
        return self.pos

    @property
    def max_context(self) -> int:
        return self.context

    def reset(self) -> None:
        self._kv_fn["remove_sequence"](self.kv, 0)
        self._kv_fn["add_sequence"](self.kv, 0)
        self.pos = 0
        self.token_metrics = []

    def _check_tokens(self, tokens: list[int]) -> None:
        if self.pos + len(tokens) > self.context:
            raise XpucError(f"context of {self.context} tokens is full")
        bad = [t for t in tokens if not 0 <= t < self.config.vocab_size]
        if bad:
            raise XpucError(f"token id {bad[0]} outside the vocabulary")

    def decode(self, token: int) -> np.ndarray:
        """Feed one token (sparse decode path); returns the next-token logits (its metrics in ``token_metrics``)."""
        before = self.reader.metrics()
        self._stall = 0.0
        self._fired = 0
        t0 = time.perf_counter()
        logits = self._step(token)
        dt = time.perf_counter() - t0
        after = self.reader.metrics()
        self.token_metrics.append(TokenMetrics(dt, after["bytes_read"] - before["bytes_read"],
                                               after["requests"] - before["requests"],
                                               after["io_seconds"] - before["io_seconds"], self._stall,
                                               self._fired * self.flash.cluster_bytes))
        return logits

    def _step(self, token: int) -> np.ndarray:
        self._check_tokens([token])
        fn, kv_fn = self.fn, self._kv_fn
        kv_fn["begin_forward"](self.kv, self._shape([0]), self._shape([1]))
        self._ids[0, 0] = token
        if self._resident is not None and self.cluster_selector is None:
            call, layers = self._resident
            logits, self.kv = call(self._ids_t, self.kv, self.embed_table, self.final_norm, self.head_table,
                                   self.pool_t, layers)
            kv_fn["end_forward"](self.kv)
            self.pos += 1
            for seg in self.cache.layers:
                seg.hits += seg.n_hot
            self.cache.next_token()
            return logits.numpy()[0, -1]
        h = fn["embed"](self._ids_t, self.embed_table)
        pending: dict = {}
        predict_in_layer = self.mode != "naive" and not self.config.is_moe and self.cluster_selector is None
        for i, L in enumerate(self.layers):
            ys, yw = self._parts()
            if self.mode == "full":
                self._prefetch(i, h, ys, yw, pending)
            if predict_in_layer and not self.always_active[i]:
                h, x, mask, self.kv = fn["layer_predict"](h, ys, yw, self.kv, L["id"], *L["attn"][:4],
                                                          *self.pred[i], *L["attn"][4:])
            else:
                h, x, self.kv = fn["layer"](h, ys, yw, self.kv, L["id"], *L["attn"])
                mask = None
            self._ffn_layer(i, x, mask, pending)
        ys, yw = self._parts()
        logits = fn["head"](h, ys, yw, self.final_norm, self.head_table)
        kv_fn["end_forward"](self.kv)
        self.pos += 1
        if self.cache is not None:
            self.cache.next_token()
        return logits.numpy()[0, -1]

    # --- dense prefill -------------------------------------------------------------------------------------
    def prefill_dense(self, tokens: list[int]) -> np.ndarray:
        """Feed a whole prompt through the dense path (PowerInfer-2's prefill); returns the last token's logits.

        Layer by layer: the compiled attention for the whole chunk of prompt tokens, then the layer's FFN for all
        of them at once over every neuron, its weights fetched once per layer in chunks (resident clusters copied
        from the neuron cache, the others read from flash with their checksums checked, the next chunk's reads in
        flight while one is computed): for a few tokens the compiled dense neuron-cluster kernel per token, for
        more the chunk dequantized by the compiled kernel and the products through numpy's BLAS.
        """
        tokens = [int(t) for t in tokens]
        if not tokens:
            raise XpucError("the prompt is empty")
        self._check_tokens(tokens)
        logits = None
        for a in range(0, len(tokens), PREFILL_CHUNK):
            logits = self._prefill_chunk(tokens[a:a + PREFILL_CHUNK])
        return logits

    def _prefill_chunk(self, tokens: list[int]) -> np.ndarray:
        n, d = len(tokens), self.config.hidden_size
        fn, kv_fn = self.fn, self._kv_fn
        kv_fn["begin_forward"](self.kv, self._shape([0]), self._shape([n]))
        h = fn["embed"](self._tensor(np.asarray(tokens, np.int32).reshape(1, n), self._dev), self.embed_table)
        y = aligned_empty((1, 1, n, d), "float32")
        y[...] = 0.0  # the layers' FFN outputs, one part of weight 1 each (0 before the first layer)
        ys, yw = self._view(y), self._tensor(np.ones(1, np.float32), self._dev)
        for i, L in enumerate(self.layers):
            h, x, self.kv = fn["layer"](h, ys, yw, self.kv, L["id"], *L["attn"])
            y[0, 0] = self._ffn_layer_batch(i, np.from_dlpack(x).reshape(n, d))
        logits = fn["head"](h, ys, yw, self.final_norm, self.head_table)
        kv_fn["end_forward"](self.kv)
        self.pos += n
        return logits.numpy()[0, -1]

    def prefill(self, tokens: list[int]) -> np.ndarray:
        """The prompt through :meth:`prefill_dense` when it has at least ``DENSE_PREFILL_MIN_TOKENS`` tokens, else
        token by token through the decode path; returns the last token's logits.

        The dense path costs about the same for any short prompt (every layer's weights are fetched once), stepping
        costs per token. Measured on the 7B-shaped packed model (4 layers, half of the FFN on flash, AMD EPYC
        guest, 2 vCPUs): dense 0.41-0.45 / 0.48-0.51 / 0.48-0.54 / 0.48-0.58 s for 1 / 2 / 3 / 5 tokens, stepped
        0.27 / 0.47-0.49 / 0.65-0.69 / 1.19-1.23 s.
        """
        tokens = [int(t) for t in tokens]
        if len(tokens) >= DENSE_PREFILL_MIN_TOKENS:
            return self.prefill_dense(tokens)
        if not tokens:
            raise XpucError("the prompt is empty")
        self._check_tokens(tokens)
        for t in tokens:
            logits = self._step(t)
        return logits

    def generate(self, prompt: list[int], max_new_tokens: int, progress=None) -> tuple[list[int], RunMetrics]:
        """Greedy generation through :func:`xpuc.runtime.generation.generate`; per-token metrics of the decode
        steps (flash bytes, requests, I/O time, stalls)."""

        def on_token(_tok: int) -> None:
            if progress and self.token_metrics:
                progress(len(self.token_metrics), max_new_tokens - 1)

        res = generate(self, prompt, max_new_tokens, vocab_size=self.config.vocab_size, on_token=on_token)
        return res.tokens, RunMetrics(self.mode, list(self.token_metrics), res.prefill_s)

    def close(self) -> None:
        self.reader.close()
        if getattr(self, "_blas_limit", None) is not None:
            self._blas_limit.restore_original_limits()
            self._blas_limit = None

    def __enter__(self) -> OffloadModel:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
