"""Decoding a model whose FFN weights live on flash: predictor -> cache -> reads -> sparse kernels.

One runtime, four modes that share the kernels, the flash file and the fixed segment:

``naive``     every token streams each layer's whole FFN from flash (large sequential reads) and runs the
              dense neuron-cluster kernel on it.
``llmflash``  LLM-in-a-flash: the predictor selects clusters, bundled records are read for the ones not in
              memory, memory is managed by a sliding window over the last 5 tokens; reads are synchronous
              and there is no hot segment.
``cache``     + PowerInfer-2's segmented cache: the most frequent clusters are loaded at start and pinned
              (hot segment), the rest of the budget is an LRU cold segment; reads still synchronous.
``full``      + the neuron-cluster pipeline: a layer's misses are read by the I/O threads while the compute
              thread runs the resident clusters, then the arrived ones; the next layer's cold clusters are
              predicted from the hidden state before attention and prefetched while attention runs. With
              ``per_chunk = True`` the reads go out in 1 MiB chunks and each chunk is computed as it lands
              (finer overlap; on the 2-vCPU development host the extra kernel launches contend with the I/O
              threads and it was slower, so it is off by default).

The fixed segment (embeddings, attention, norms, LM head, KV cache, predictor, MoE routers) stays in
memory; its projections run through xpuc's fp16 GEMV kernels, attention itself in numpy.

Mixture-of-experts models: every expert is an FFN unit of its own (its flash region, cache segments,
predictor). A layer's router picks the token's experts first (top-k, Mixtral's weights); only their
units are predicted, read and computed, and their outputs are summed with the routing weights. In ``full``
mode the next layer's experts are routed from the hidden state before attention and their predicted
clusters prefetched, as for dense layers.
"""

from __future__ import annotations

import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from xpuc.compiler.errors import XpucError
from xpuc.compiler.reference import rms_norm

MODES = ("naive", "llmflash", "cache", "full")
CHUNK_BYTES = 1 << 20  # bytes of records per pipelined read batch (full mode)
PREFILL_CHUNK_BYTES = 16 << 20  # dequantized float32 weights per prefill chunk
DENSE_PREFILL_MIN_TOKENS = 6  # shorter prompts are stepped through the sparse path (see feed_prompt)


@dataclass
class TokenMetrics:
    seconds: float
    bytes_read: int
    requests: int
    io_seconds: float
    stall_seconds: float


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
                "io_hidden": min(1.0, max(0.0, 1.0 - stall / io)) if io > 0 else 1.0}


class _Linear:
    """``y = x @ W.T`` through xpuc's fp16 GEMV kernel (weights row-block packed once), or, with ``fmt``, the
    quantized one (``w`` given as GGML rows (n, k/32 * block bytes), interleaved once for the kernel)."""

    _cache: dict = {}

    def __init__(self, w: np.ndarray, target, fmt: str = "float16") -> None:
        import tvm

        from xpuc.runtime.flash_reader import aligned_empty
        from xpuc.schedules.linear import linear_fp16, pack_rows
        from xpuc.schedules.linear_quant import QBLOCK, QUANT_FORMATS, linear_quant, quantized_shape

        self.fmt = fmt
        if fmt == "float16":
            n, k = w.shape
            data = pack_rows(w.astype(np.float16))
        else:  # interleaved by the copy into the kernel's buffer below (no contiguous temporary)
            n, k = w.shape[0], w.shape[1] // QUANT_FORMATS[fmt] * QBLOCK
            nr, nb, r, bb = quantized_shape(k, n, fmt)
            data = w.reshape(nr, r, nb, bb).transpose(0, 2, 1, 3)
        key = (k, n, fmt, str(target))
        if key not in self._cache:
            f = linear_fp16(k, n) if fmt == "float16" else linear_quant(k, n, fmt)
            f = f.with_attr("global_symbol", "linear")
            self._cache[key] = tvm.compile(tvm.IRModule({"linear": f}), target=target)["linear"]
        self.fn = self._cache[key]
        if fmt == "float16":
            self.w = tvm.runtime.tensor(data, tvm.cpu())
        else:  # shared with numpy, so that a tied embedding can be read from it (see rows)
            self._data = aligned_empty(data.shape, "uint8")
            self._data[...] = data
            self.w = tvm.runtime.from_dlpack(self._data)
        self.nbytes = data.nbytes
        del data
        self.y = tvm.runtime.tensor(np.zeros((1, 1, n), np.float32), tvm.cpu())
        # the input and output live in buffers shared with the kernel (no per-call tensor conversions)
        self._x = aligned_empty((1, 1, k), "float32")
        self._xt = tvm.runtime.from_dlpack(self._x)
        self._y = np.from_dlpack(self.y)[0, 0]

    def __call__(self, x: np.ndarray) -> np.ndarray:
        self._x[0, 0] = x
        self.fn(self._xt, self.w, self.y)
        return self._y.copy()

    def rows(self, ids: np.ndarray) -> np.ndarray:
        """Rows ``ids`` of a quantized matrix as float32 (a tied embedding read from the LM head's copy)."""
        from xpuc.schedules.linear_quant import dequantize_rows

        _, nb, r, bb = self._data.shape
        return dequantize_rows(self._data[ids // r, :, ids % r, :].reshape(len(ids), nb * bb), self.fmt)


class _Embedding:
    """Token rows of the embedding table: fp16 rows, or GGML rows dequantized on lookup."""

    def __init__(self, w: np.ndarray, fmt: str) -> None:
        self.w, self.fmt = (w.astype(np.float16) if fmt == "float16" else w), fmt
        self.nbytes = self.w.nbytes

    def rows(self, ids: np.ndarray) -> np.ndarray:
        from xpuc.schedules.linear_quant import dequantize_rows

        if self.fmt == "float16":
            return self.w[ids].astype(np.float32)
        return dequantize_rows(self.w[ids], self.fmt)


def _return_freed_memory() -> None:
    """Give the heap's free pages back to the OS (glibc keeps them after large frees; RSS would count them)."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


class _RopeAt:
    """Rotate-half RoPE at one position (``xpuc.compiler.reference.rope``'s arithmetic, table built once)."""

    def __init__(self, pos: int, head_dim: int, theta: float) -> None:
        inv = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
        ang = np.concatenate([pos * inv, pos * inv])
        self.cos, self.sin = np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)
        self.half = head_dim // 2

    def __call__(self, x: np.ndarray) -> np.ndarray:
        rot = np.concatenate([-x[..., self.half:], x[..., :self.half]], -1)
        return x * self.cos + rot * self.sin


class OffloadModel:
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
        Compute threads of the kernels, I/O threads of the reader.
    context:
        KV cache length.
    """

    def __init__(self, artifact: str | Path, mode: str = "full", ffn_fraction: float | None = None,
                 threads: int | None = None, io_threads: int | None = None, context: int = 512) -> None:
        from xpuc.compiler.offload_pack import load_offload_artifact
        from xpuc.runtime.flash_reader import FlashReader
        from xpuc.targets.profile import load_profile

        if mode not in MODES:
            raise XpucError(f"unknown mode '{mode}' (known: {', '.join(MODES)})")
        self.mode = mode
        art = load_offload_artifact(Path(artifact))
        self.art = art
        self.config = c = art.config
        self.flash = fl = art.flash
        self.plan = art.plan
        self.predictor = art.predictor
        self.crcs = art.crcs
        self.threads = threads or self.plan.compute_threads
        self.split_kernel = self.plan.ffn_kernel == "split" and art.flash.bundle_layout(1).gated
        target = load_profile("host").cpu_target()
        # each matrix is dropped from the loaded file's dict once its kernel copy exists (the peak stays near
        # one copy of the fixed segment)
        w, fmt = art.fixed, art.fixed_dtype
        art.fixed = None
        self.final_norm = w.pop("final_norm").astype(np.float32)
        head = w.pop("lm_head", None)
        self.head = _Linear(w["embed_tokens"] if c.tie_embeddings else head, target, fmt)
        del head
        # a tied quantized embedding is read from the LM head's copy (one table in memory)
        tied = c.tie_embeddings and fmt != "float16"
        self.embed = self.head if tied else _Embedding(w.pop("embed_tokens"), fmt)
        w.pop("embed_tokens", None)
        self.layers = []
        for i in range(c.num_layers):
            p = f"layers.{i}."
            qkv = np.concatenate([w.pop(p + "q_proj"), w.pop(p + "k_proj"), w.pop(p + "v_proj")])
            self.layers.append({"qkv": _Linear(qkv, target, fmt), "o": _Linear(w.pop(p + "o_proj"), target, fmt),
                                "attn_norm": w.pop(p + "attn_norm").astype(np.float32),
                                "ffn_norm": w.pop(p + "ffn_norm").astype(np.float32),
                                "router": w.pop(p + "router").astype(np.float32) if c.is_moe else None})
            del qkv
        del w
        _return_freed_memory()
        self.context = context
        shape = (c.num_layers, context, c.num_kv_heads, c.head_dim)
        self.k_cache, self.v_cache = np.zeros(shape, np.float32), np.zeros(shape, np.float32)
        self.pos = 0
        self._stall = 0.0
        self._prefill_chunk = None
        self._dequantizers: dict = {}
        self.per_chunk = False  # full mode: compute each read chunk as it lands (see the module docstring)
        self.reader = FlashReader(art.path / fl.ffn_file, fl.cluster_bytes,
                                  io_threads or self.plan.io_threads, direct=True,
                                  queue_depth=self.plan.queue_depth)
        if self.reader.size < fl.file_bytes:
            self.reader.close()
            raise XpucError(f"{art.path / fl.ffn_file}: truncated ({self.reader.size} of {fl.file_bytes} bytes)")
        self._setup_ffn(ffn_fraction, target)
        # numpy's BLAS (OpenBLAS) keeps its threads spinning after each call, taking the cores from TVM's kernels
        # (measured on the 7B-shaped model, everything in memory: 8.0 tok/s with two BLAS threads, 11.9 with
        # one). Decoding multiplies only small matrices with numpy: one BLAS thread; prefill gets them all.
        from threadpoolctl import threadpool_info, threadpool_limits

        self._blas_threads = max([i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"], default=1)
        self._blas_limit = threadpool_limits(1, user_api="blas")

    # --- FFN memory ---------------------------------------------------------------------------------------
    def _cluster_frequency(self) -> np.ndarray:
        fl = self.flash
        f = np.asarray(self.art.stats.frequency, np.float64)
        out = np.zeros((len(fl.layers), fl.n_clusters))
        for i, r in enumerate(fl.layers):
            out[i] = f[i][np.asarray(r.order)].reshape(fl.n_clusters, fl.cluster).max(1)
        return out

    def split_budget(self, ffn_fraction: float, cold_share: float = 0.25) -> tuple[list[int], list[int]]:
        """Hot clusters per layer (globally most frequent first) and cold slots per layer for a budget."""
        fl, L = self.flash, len(self.flash.layers)
        slots = int(ffn_fraction * L * fl.n_clusters)
        if slots < 2 * L:
            raise XpucError(f"FFN budget of {100 * ffn_fraction:.1f} % leaves fewer than two cluster slots per "
                            f"{'expert' if self.config.is_moe else 'layer'}; raise the budget")
        cold_each = max(1, int(slots * cold_share) // L)
        n_hot = min(slots - cold_each * L, L * fl.n_clusters)
        freq = self._cluster_frequency()
        order = np.argsort(-freq, axis=None, kind="stable")[:n_hot]
        hot = np.bincount(order // fl.n_clusters, minlength=L)
        # hot clusters of a layer are a prefix of its storage order (sorted by frequency)
        cold = [min(cold_each, fl.n_clusters - int(h)) for h in hot]
        # slots a layer cannot use (all its clusters fit) go to the cold segments of layers that still miss
        spare = slots - int(hot.sum()) - sum(cold)
        for i in np.argsort([int(h) + c - fl.n_clusters for h, c in zip(hot, cold, strict=True)], kind="stable"):
            add = min(spare, fl.n_clusters - int(hot[i]) - cold[i])
            cold[i] += add
            spare -= add
        return [int(h) for h in hot], cold

    def _setup_ffn(self, ffn_fraction: float | None, target) -> None:
        from xpuc.runtime.flash_reader import aligned_empty
        from xpuc.runtime.neuron_cache import NeuronCache
        from xpuc.runtime.sparse_ffn import SparseFFNKernel

        fl, L = self.flash, len(self.flash.layers)
        rec_layout = fl.bundle_layout(1)
        rec_shape = rec_layout.shape()[1:]
        if ffn_fraction is None:
            ffn_fraction = (self.plan.budget_bytes - self.plan.fixed_bytes) / (L * fl.n_clusters * fl.cluster_bytes)
        ffn_fraction = float(min(max(ffn_fraction, 0.0), 1.0))
        self.ffn_fraction = ffn_fraction
        thr = self.art.stats.thresholds
        self.cache = None
        if self.mode == "naive":
            self.scratch = aligned_empty((fl.n_clusters, *rec_shape), rec_layout.storage_dtype)
            pool, n_slots = self.scratch, fl.n_clusters
        else:
            hot, cold = self.split_budget(ffn_fraction)
            if self.mode == "llmflash":  # no hot segment: the same memory as one windowed cache
                cold, hot = [h + c for h, c in zip(hot, cold, strict=False)], [0] * L
            self.cache = NeuronCache(rec_shape, rec_layout.storage_dtype, fl.n_clusters, hot, cold,
                                     "window" if self.mode == "llmflash" else "lru")
            pool, n_slots = self.cache.pool, self.cache.pool.shape[0]
            for i, seg in enumerate(self.cache.layers):  # load the hot segments
                if seg.n_hot:
                    self.reader.read_span(fl.cluster_offset(i, 0), pool[seg.start:seg.start + seg.n_hot])
                    crc = self.crcs[i, :seg.n_hot]
                    bad = [j for j in range(seg.n_hot) if zlib.crc32(pool[seg.start + j]) != int(crc[j])]
                    if bad:
                        raise XpucError(f"{self.art.path / fl.ffn_file}: hot cluster {bad[0]} of layer {i} fails "
                                        "its checksum (corrupted flash file)")
        self.kernel = SparseFFNKernel(fl.bundle_layout(n_slots), pool, target, self.threads, float(thr[0]),
                                      share=True)
        self._thr = [float(t) for t in thr]
        self._cluster_of = [fl.cluster_of_neuron(i) for i in range(L)]
        self.reader.reset_counters()

    def accounted_bytes(self) -> dict:
        embed = 0 if self.embed is self.head else self.embed.nbytes
        fixed = self.head.nbytes + embed + sum(d["qkv"].nbytes + d["o"].nbytes for d in self.layers)
        fixed += sum(d["router"].nbytes for d in self.layers if d["router"] is not None)
        fixed += self.k_cache.nbytes + self.v_cache.nbytes
        if self.predictor is not None:
            fixed += sum(lp.w1.nbytes + lp.w2.nbytes for lp in self.predictor.layers)
        ffn = self.scratch.nbytes if self.mode == "naive" else self.cache.nbytes
        staged = 0  # the prefill's staging buffer and its dequantized chunks, once a prompt has been fed
        if self._prefill_chunk is not None:
            staged = self._prefill_chunk.nbytes + sum(d.out.nbytes for d in self._dequantizers.values())
        return {"fixed": int(fixed), "ffn": int(ffn), "prefill": int(staged), "total": int(fixed + ffn + staged)}

    # --- FFN paths -------------------------------------------------------------------------------------------
    def _units(self, layer: int, x: np.ndarray) -> tuple[list[int], list[float]]:
        """FFN units of ``layer`` for one token's normalised input ``x`` and their output weights."""
        c = self.config
        if not c.is_moe:
            return [layer], [1.0]
        from xpuc.compiler.reference import route_tokens

        top, w = route_tokens(x[None], self.layers[layer]["router"], c.experts_per_token)
        return [layer * c.num_experts + int(e) for e in top[0]], [float(v) for v in w[0]]

    def _ffn_layer(self, layer: int, x: np.ndarray, pending: dict) -> np.ndarray:
        """Layer ``layer``'s FFN for one token: its unit(s) through the mode's path, weighted and summed."""
        units, weights = self._units(layer, x)
        y = np.zeros_like(x)
        for u, wt in zip(units, weights, strict=True):
            out = self._ffn_naive(u, x) if self.mode == "naive" else self._ffn_cached(u, x, pending)
            y += out if wt == 1.0 else out * np.float32(wt)
        return y

    def _predict(self, i: int, x: np.ndarray) -> np.ndarray:
        mask = self.predictor.layers[i].predict(x)
        sel = np.zeros(self.flash.n_clusters, bool)  # the predicted neurons' clusters, sorted, each once
        sel[self._cluster_of[i][mask]] = True
        return np.flatnonzero(sel).astype(np.int32)

    def _run(self, i: int, x: np.ndarray, slots: np.ndarray) -> np.ndarray:
        if slots.size == 0:
            return np.zeros_like(x)
        self.kernel.set_threshold(self._thr[i])
        idx = np.sort(slots).astype(np.int32)
        if self.split_kernel:  # the plan's tuned choice: gate first, then up/down of the neurons that fired
            return self.kernel.updown(x, idx, self.kernel.gate(x, idx))
        return self.kernel(x, idx)

    def _ffn_naive(self, i: int, x: np.ndarray) -> np.ndarray:
        t0 = time.perf_counter()
        self.reader.read_span(self.flash.cluster_offset(i, 0), self.scratch)
        self._stall += time.perf_counter() - t0
        self.kernel.set_threshold(self._thr[i])
        return self.kernel.dense(x)

    def _issue(self, i: int, miss: np.ndarray, keep: np.ndarray, partial: bool = False
               ) -> list[tuple[object, np.ndarray]]:
        """Assign slots to missing clusters and submit their reads in chunks; returns (future, slots).
        ``partial``: read only as many as there are evictable slots (prefetch)."""
        if miss.size == 0:
            return []
        victims = self.cache.victims(i, miss.size, keep)
        if len(victims) < miss.size:
            if not partial:
                raise XpucError("internal: cold segment smaller than one token's misses")
            miss = miss[: len(victims)]
            if miss.size == 0:
                return []
        out = []
        slots = np.asarray(victims[: miss.size], np.int32)
        self.cache.assign(i, miss, slots)
        base = self.flash.cluster_offset(i, 0)
        pool = self.cache.pool
        chunk = max(1, CHUNK_BYTES // self.flash.cluster_bytes) if self.per_chunk else miss.size
        for a in range(0, miss.size, chunk):
            cs, ss = miss[a:a + chunk], slots[a:a + chunk]
            offs = base + cs.astype(np.int64) * self.flash.cluster_bytes
            fut = self.reader.submit(offs, [pool[s] for s in ss], self.crcs[i, cs])
            out.append((fut, ss))
        return out

    def _wait(self, jobs: list) -> None:
        t0 = time.perf_counter()
        for fut, _ in jobs:
            fut.result()
        self._stall += time.perf_counter() - t0

    def _ffn_cached(self, i: int, x: np.ndarray, pending: dict) -> np.ndarray:
        seg = self.cache.layers[i]
        need = self._predict(i, x)
        self._wait(pending.pop(i, []))  # prefetched reads land before their slots can be reused
        hit_slots, miss = self.cache.lookup(i, need)
        cold_hits = int((hit_slots >= seg.cold_start).sum())
        room = seg.n_cold - cold_hits
        y = np.zeros_like(x)
        pipelined = self.mode == "full"
        if miss.size <= room:  # one wave; resident clusters stay protected
            jobs = self._issue(i, miss, need)
            if pipelined:  # compute what is resident while the reads are in flight, then what arrived
                y += self._run(i, x, hit_slots)
                if self.per_chunk:
                    for job in jobs:
                        self._wait([job])
                        y += self._run(i, x, job[1])
                else:
                    self._wait(jobs)
                    y += self._run(i, x, np.concatenate([ss for _, ss in jobs]) if jobs else np.zeros(0, np.int32))
            else:
                self._wait(jobs)
                got = [ss for _, ss in jobs]
                y += self._run(i, x, np.concatenate([hit_slots, *got]))
            return y
        # more misses than free cold slots: compute the resident clusters, then stream the misses through
        # the whole cold segment wave by wave
        y += self._run(i, x, hit_slots)
        for a in range(0, miss.size, max(seg.n_cold, 1)):
            part = miss[a:a + seg.n_cold]
            jobs = self._issue(i, part, part)
            if pipelined:
                for job in jobs:
                    self._wait([job])
                    y += self._run(i, x, job[1])
            else:
                self._wait(jobs)
                y += self._run(i, x, np.concatenate([ss for _, ss in jobs]))
        return y

    def _prefetch(self, layer: int, h: np.ndarray, pending: dict) -> None:
        """Predict layer ``layer``'s clusters (of its routed experts, for MoE) from the hidden state before
        attention and start their reads."""
        if layer >= len(self.layers):
            return
        x = rms_norm(h, self.layers[layer]["ffn_norm"], self.config.rms_norm_eps)[0]
        for i in self._units(layer, x)[0]:
            if self.cache.layers[i].n_cold == 0:
                continue
            guess = self._predict(i, x)
            slots = self.cache.layers[i].slot_of[guess]
            miss = guess[slots < 0][: self.cache.layers[i].n_cold // 2]
            pending[i] = self._issue(i, miss, guess, partial=True)

    # --- decoding ------------------------------------------------------------------------------------------
    def reset(self) -> None:
        self.pos = 0

    def _attention(self, i: int, h: np.ndarray, rotate: _RopeAt, pos: int) -> np.ndarray:
        """Layer ``i``'s attention output for one token's hidden state ``h`` (1, d) at ``pos`` (KV cache filled)."""
        c, L = self.config, self.layers[i]
        x = rms_norm(h, L["attn_norm"], c.rms_norm_eps)[0]
        qkv = L["qkv"](x)
        nq, nk = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        q = rotate(qkv[:nq].reshape(c.num_heads, c.head_dim))
        self.k_cache[i, pos] = rotate(qkv[nq:nq + nk].reshape(c.num_kv_heads, c.head_dim))
        self.v_cache[i, pos] = qkv[nq + nk:].reshape(c.num_kv_heads, c.head_dim)
        k, v = self.k_cache[i, :pos + 1], self.v_cache[i, :pos + 1]
        rep = c.num_heads // c.num_kv_heads
        qh = q.reshape(c.num_kv_heads, rep, c.head_dim)
        s = np.einsum("grd,tgd->grt", qh, k) / np.sqrt(c.head_dim)
        s = np.exp(s - s.max(-1, keepdims=True))
        s /= s.sum(-1, keepdims=True)
        a = np.einsum("grt,tgd->grd", s, v).reshape(-1)
        return L["o"](a)[None]

    def _check_tokens(self, tokens: list[int]) -> None:
        if self.pos + len(tokens) > self.context:
            raise XpucError(f"context of {self.context} tokens is full")
        bad = [t for t in tokens if not 0 <= t < self.config.vocab_size]
        if bad:
            raise XpucError(f"token id {bad[0]} outside the vocabulary")

    def step(self, token: int) -> np.ndarray:
        """Feed one token (sparse decode path); returns the next-token logits."""
        c = self.config
        self._check_tokens([token])
        h = self.embed.rows(np.array([token]))
        rotate = _RopeAt(self.pos, c.head_dim, c.rope_theta)  # one table for every layer of this token
        pending: dict = {}
        for i, L in enumerate(self.layers):
            if self.mode == "full":
                self._prefetch(i, h, pending)
            h = h + self._attention(i, h, rotate, self.pos)
            x = rms_norm(h, L["ffn_norm"], c.rms_norm_eps)[0].astype(np.float32)
            h = h + self._ffn_layer(i, x, pending)[None]
        self.pos += 1
        if self.cache is not None:
            self.cache.next_token()
        h = rms_norm(h, self.final_norm, c.rms_norm_eps)[0]
        return self.head(h.astype(np.float32))

    # --- dense prefill -------------------------------------------------------------------------------------
    def prefill(self, tokens: list[int]) -> np.ndarray:
        """Feed a whole prompt through the dense path (PowerInfer-2's prefill); returns the last token's logits.

        Its FFN matrix products run through numpy's BLAS with the threads it had before this model limited it.
        """
        from threadpoolctl import threadpool_limits

        with threadpool_limits(self._blas_threads, user_api="blas"):
            return self._prefill(tokens)

    def _prefill(self, tokens: list[int]) -> np.ndarray:
        """The dense prompt path (see :meth:`prefill`).

        Layer by layer: attention token by token through the KV cache, then the layer's FFN for all prompt
        tokens at once over every neuron, its weights fetched once per layer in chunks of clusters (resident
        clusters copied from the neuron cache, the others read from flash with their checksums checked).
        Stepping the tokens one by one through :meth:`step` reads each layer's FFN once per token instead.
        """
        c = self.config
        tokens = [int(t) for t in tokens]
        if not tokens:
            raise XpucError("the prompt is empty")
        self._check_tokens(tokens)
        h = self.embed.rows(np.asarray(tokens))
        rotates = [_RopeAt(self.pos + t, c.head_dim, c.rope_theta) for t in range(len(tokens))]
        for i, L in enumerate(self.layers):
            for t in range(len(tokens)):
                h[t:t + 1] += self._attention(i, h[t:t + 1], rotates[t], self.pos + t)
            h += self._ffn_layer_batch(i, rms_norm(h, L["ffn_norm"], c.rms_norm_eps).astype(np.float32))
        self.pos += len(tokens)
        return self.head(rms_norm(h[-1:], self.final_norm, c.rms_norm_eps)[0].astype(np.float32))

    def feed_prompt(self, tokens: list[int]) -> np.ndarray:
        """The prompt through :meth:`prefill` when it has at least ``DENSE_PREFILL_MIN_TOKENS`` tokens, else token
        by token through :meth:`step`; returns the last token's logits.

        The dense path costs about the same for any short prompt (every layer's weights are fetched and
        dequantized once), stepping costs per token: on the 7B-shaped benchmark model (4 layers, cache mode,
        2 vCPUs) dense took 1.7-1.9 s for 4 tokens, 2.1 s for 8 and 2.7-3.0 s for 32; stepping 1.3-1.5 s,
        3.1 s and 10.4 s.
        """
        tokens = [int(t) for t in tokens]
        if len(tokens) >= DENSE_PREFILL_MIN_TOKENS:
            return self.prefill(tokens)
        if not tokens:
            raise XpucError("the prompt is empty")
        self._check_tokens(tokens)
        for t in tokens:
            logits = self.step(t)
        return logits

    def _fetch_clusters(self, i: int, ids: np.ndarray, dest: np.ndarray) -> None:
        """Records of layer ``i``'s clusters ``ids`` (sorted) into ``dest``: from the cache when resident."""
        missing = np.ones(ids.size, bool)
        if self.cache is not None:
            slots = self.cache.layers[i].slot_of[ids]
            missing = slots < 0
            dest[~missing] = self.cache.pool[slots[~missing]]
        if missing.any():
            want = ids[missing]
            offs = self.flash.cluster_offset(i, 0) + want.astype(np.int64) * self.flash.cluster_bytes
            self.reader.read(offs, [dest[j] for j in np.flatnonzero(missing)], self.crcs[i, want])

    def _ffn_layer_batch(self, layer: int, x: np.ndarray) -> np.ndarray:
        """Layer ``layer``'s dense FFN for a batch (T, d); MoE: each expert on the tokens routed to it."""
        c = self.config
        if not c.is_moe:
            return self._ffn_dense_batch(layer, x)
        from xpuc.compiler.reference import apply_experts

        return apply_experts(x, self.layers[layer]["router"], c.experts_per_token,
                             lambda e, rows: self._ffn_dense_batch(layer * c.num_experts + e, rows))

    def _ffn_dense_batch(self, i: int, x: np.ndarray) -> np.ndarray:
        """Dense FFN of unit ``i`` for a batch ``x`` (T, d): chunks of clusters dequantized by a compiled kernel
        (:class:`~xpuc.runtime.sparse_ffn.BundleDequantizer`), multiplied by numpy/BLAS."""
        from xpuc.schedules.neuron_bundle import activation

        fl = self.flash
        chunk = self._prefill_buffer()
        y = np.zeros_like(x)
        for a in range(0, fl.n_clusters, chunk.shape[0]):
            ids = np.arange(a, min(a + chunk.shape[0], fl.n_clusters), dtype=np.int64)
            buf = chunk[:ids.size]
            self._fetch_clusters(i, ids, buf)
            layout = fl.bundle_layout(ids.size)
            w = self._dequantizer(ids.size)(buf).reshape(-1, layout.rows, layout.d_model)
            if layout.gated:
                h = activation(layout.kind, x @ w[:, 0].T, x @ w[:, 1].T, self._thr[i])
            else:
                h = activation(layout.kind, x @ w[:, 0].T, None)
            y += h.astype(np.float32) @ w[:, -1]
        return y

    def _dequantizer(self, n: int):
        """The compiled dequantizer for chunks of ``n`` clusters (the full chunk size and the tail)."""
        from xpuc.runtime.sparse_ffn import BundleDequantizer

        if n not in self._dequantizers:
            self._dequantizers[n] = BundleDequantizer(self.flash.bundle_layout(n), threads=self.threads)
        return self._dequantizers[n]

    def _prefill_buffer(self) -> np.ndarray:
        """Aligned staging buffer of the prefill's cluster chunks (about PREFILL_CHUNK_BYTES dequantized)."""
        if self._prefill_chunk is None:
            from xpuc.runtime.flash_reader import aligned_empty

            fl = self.flash
            layout = fl.bundle_layout(1)
            per_cluster = fl.cluster * layout.rows * layout.d_model * 4  # float32 after dequantization
            n = int(min(fl.n_clusters, max(1, PREFILL_CHUNK_BYTES // per_cluster)))
            self._prefill_chunk = aligned_empty((n, *layout.shape()[1:]), layout.storage_dtype)
        return self._prefill_chunk

    def generate(self, prompt: list[int], max_new_tokens: int, progress=None) -> tuple[list[int], RunMetrics]:
        """Greedy generation; per-token metrics of the decode steps."""
        m = RunMetrics(self.mode)
        self.reset()
        t0 = time.perf_counter()
        logits = self.feed_prompt(prompt)
        m.prefill_seconds = time.perf_counter() - t0
        out: list[int] = []
        for n in range(max_new_tokens):
            tok = int(np.argmax(logits))
            out.append(tok)
            if n == max_new_tokens - 1 or self.pos >= self.context:
                break
            before = self.reader.metrics()
            self._stall = 0.0
            t0 = time.perf_counter()
            logits = self.step(tok)
            dt = time.perf_counter() - t0
            after = self.reader.metrics()
            m.tokens.append(TokenMetrics(dt, after["bytes_read"] - before["bytes_read"],
                                         after["requests"] - before["requests"],
                                         after["io_seconds"] - before["io_seconds"], self._stall))
            if progress:
                progress(n + 1, max_new_tokens - 1)
        return out, m

    def close(self) -> None:
        self.reader.close()
        if getattr(self, "_blas_limit", None) is not None:
            self._blas_limit.restore_original_limits()
            self._blas_limit = None

    def __enter__(self) -> OffloadModel:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
