"""The FFN side of offloaded decoding: which clusters a token needs, where they are, reads, kernel calls.

:class:`FFNPaths` is the part of :class:`xpuc.runtime.offload.OffloadModel` that owns the neuron cache, the
flash reads and the calls into the compiled neuron-cluster kernels (``ffn.so``). Every kernel writes one
output part (a row of the parts buffer) that the next compiled layer call adds, weighted.
"""

from __future__ import annotations

import time

import numpy as np

from xpuc.runtime.errors import XpucError
from xpuc.runtime.flash_reader import RecordRows, aligned_empty
from xpuc.runtime.formats.bundle import activation
from xpuc.runtime.neuron_cache import NeuronCache

MODES = ("naive", "llmflash", "cache", "full")
PREDICTOR_MIN_IDLE = 0.01  # a unit whose clusters are expected idle on fewer than 1 % of (cluster, token) pairs

CHUNK_BYTES = 1 << 20  # bytes of records per pipelined read batch (full mode, per_chunk)
PREFILL_CHUNK_BYTES = 16 << 20  # dequantized float32 weights per prefill chunk
# prompts of up to this many tokens run the compiled dense kernel once per token over each fetched chunk instead
# of dequantizing it for numpy (7B-shaped layers, 5 tokens: see OffloadModel.prefill)
FEW_TOKENS = 8


class FFNPaths:
    """Cache, reads and sparse kernel calls (mixed into ``OffloadModel``)."""

    # --- FFN memory ---------------------------------------------------------------------------------------
    def _cluster_frequency(self) -> np.ndarray:
        fl = self.flash
        f = np.asarray(self.art.stats.frequency, np.float64)
        out = np.zeros((len(fl.layers), fl.n_clusters))
        for i, r in enumerate(fl.layers):
            out[i] = f[i][np.asarray(r.order)].reshape(fl.n_clusters, fl.cluster).max(1)
        return out

    def _always_active_units(self) -> np.ndarray:
        """Units whose predictor cannot pay: every cluster is expected to fire on nearly every token.

        A cluster is idle when none of its neurons fires; with the profile's firing frequencies ``f`` and
        neurons taken as independent, that happens with probability ``prod(1 - f)``. Where the expected share
        of idle clusters is below ``PREDICTOR_MIN_IDLE`` (SmolLM2 thresholded at 10 %: ~0), the runtime computes
        all of the unit's clusters and skips the predictor call: exact, and cheaper than predicting a mask of
        ones.
        """
        fl = self.flash
        f = np.clip(np.asarray(self.art.stats.frequency, np.float64), 0.0, 1.0 - 1e-12)
        idle = np.zeros(len(fl.layers))
        for i, r in enumerate(fl.layers):
            logs = np.log1p(-f[i][np.asarray(r.order)]).reshape(fl.n_clusters, fl.cluster).sum(1)
            idle[i] = np.exp(logs).mean()
        return idle < PREDICTOR_MIN_IDLE

    def split_budget(self, ffn_fraction: float, cold_share: float = 0.25) -> tuple[list[int], list[int]]:
        """Hot clusters per layer (globally most frequent first) and cold slots per layer for a budget."""
        fl, L = self.flash, len(self.flash.layers)
        slots = int(ffn_fraction * L * fl.n_clusters)
        if slots >= L * fl.n_clusters:  # everything fits: all of it hot, loaded once, no cold bookkeeping
            return [fl.n_clusters] * L, [0] * L
        if slots < 2 * L:
            raise XpucError(f"FFN budget of {100 * ffn_fraction:.1f} % leaves fewer than two cluster slots per "
                            f"{'expert' if self.config.is_moe else 'layer'}; raise the budget")
        cold_each = max(1, int(slots * cold_share) // L)
        n_hot = min(slots - cold_each * L, L * fl.n_clusters)
        order = np.argsort(-self._cluster_frequency(), axis=None, kind="stable")[:n_hot]
        hot = np.bincount(order // fl.n_clusters, minlength=L)
        cold = [min(cold_each, fl.n_clusters - int(h)) for h in hot]
        # slots a layer cannot use (all its clusters fit) go to the cold segments of layers that still miss
        spare = slots - int(hot.sum()) - sum(cold)
        for i in np.argsort([int(h) + c - fl.n_clusters for h, c in zip(hot, cold, strict=True)], kind="stable"):
            add = min(spare, fl.n_clusters - int(hot[i]) - cold[i])
            cold[i] += add
            spare -= add
        return [int(h) for h in hot], cold

    def _setup_ffn(self, ffn_fraction: float | None) -> None:
        from threadpoolctl import threadpool_info, threadpool_limits

        fl, L = self.flash, len(self.flash.layers)
        self.always_active = self._always_active_units()
        self._all_clusters = np.arange(fl.n_clusters, dtype=np.int32)
        rec_layout = fl.bundle_layout(1)
        rec_shape = rec_layout.shape()[1:]
        if ffn_fraction is None:
            ffn_fraction = (self.plan.budget_bytes - self.plan.fixed_bytes) / (L * fl.n_clusters * fl.cluster_bytes)
        ffn_fraction = float(min(max(ffn_fraction, 0.0), 1.0))
        self.ffn_fraction = ffn_fraction
        self.cache = None
        if self.mode == "naive":
            self.scratch = aligned_empty((fl.n_clusters, *rec_shape), rec_layout.storage_dtype)
            pool = self.scratch
            self._pool_bytes = pool.reshape(pool.shape[0], -1).view(np.uint8)
            waves = 1
        else:
            hot, cold = self.split_budget(ffn_fraction)
            if self.mode == "llmflash":  # no hot segment: the same memory as one windowed cache
                cold, hot = [h + c for h, c in zip(hot, cold, strict=False)], [0] * L
            self.cache = NeuronCache(rec_shape, rec_layout.storage_dtype, fl.n_clusters, hot, cold,
                                     "window" if self.mode == "llmflash" else "lru")
            pool = self.cache.pool
            self._pool_bytes = pool.reshape(pool.shape[0], -1).view(np.uint8)
            for i, seg in enumerate(self.cache.layers):  # load the hot segments, every record's CRC checked
                ids = np.arange(seg.n_hot, dtype=np.int32)
                for read in self._part_reads(i, ids, ids + seg.start, range(len(fl.part_bytes))):
                    self.reader.read(*read)
            waves = max(-(-fl.n_clusters // max(seg.n_cold, 1)) for seg in self.cache.layers)
        #: split records: read gate rows of the predicted clusters, up/down rows only where the gate fired
        self.exact = fl.split and self.mode in ("cache", "full")
        self.pool_t = self._view(pool)
        self._idx = aligned_empty((pool.shape[0],), "int32")
        self._g = aligned_empty((pool.shape[0], fl.cluster), "float32")
        self._g_fired = aligned_empty((pool.shape[0], fl.cluster), "float32")
        self._idx_fired = aligned_empty((pool.shape[0],), "int32")
        self._fired = 0  # neurons whose gate fired on the exact path, this token
        self._thr = [float(t) for t in self.art.stats.thresholds]
        self._thr_t = [self._tensor(np.array([t], np.float32), self._dev) for t in self._thr]
        self._cluster_of = [fl.cluster_of_neuron(i) for i in range(L)]
        self.max_parts = (self.config.experts_per_token if self.config.is_moe else 1) * (waves + 2)
        self._prefill_chunk_buf = None
        self._dequant_out: dict[int, tuple] = {}
        self.reader.reset_counters()
        # numpy's BLAS (prefill only) keeps its threads spinning after each call, taking the cores from TVM's
        # kernels: one BLAS thread while decoding, all of them while prefilling
        self._blas_threads = max([i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"], default=1)
        self._blas_limit = threadpool_limits(1, user_api="blas")

    def prefill_staged_bytes(self) -> int:
        if self._prefill_chunk_buf is None:
            return 0
        return self._prefill_chunk_buf.nbytes + sum(o.nbytes for o, _ in self._dequant_out.values())

    # --- one token ---------------------------------------------------------------------------------------
    def _mask_clusters(self, mask) -> np.ndarray:
        return np.flatnonzero(np.from_dlpack(mask)).astype(np.int32)  # sorted

    def _predict(self, i: int, x) -> np.ndarray:
        """Clusters of unit ``i`` predicted to fire for the FFN input ``x`` (sorted ids), by the compiled
        predictor."""
        if isinstance(x, np.ndarray):
            x = self._tensor(np.ascontiguousarray(x, np.float32).reshape(-1), self._dev)
        return self._mask_clusters(self.fn["predict"](x, *self.pred[i]))

    def _select(self, i: int, x, mask) -> np.ndarray:
        """Clusters unit ``i`` computes: a substituted selector's (e.g. the tests' oracle mask), else the compiled
        predictor's (its mask from the layer call when there is one)."""
        if self.cluster_selector is not None:
            return np.unique(np.asarray(self.cluster_selector(i, np.from_dlpack(x).copy()), np.int32))  # sorted
        if self.always_active[i]:
            return self._all_clusters
        return self._mask_clusters(mask) if mask is not None else self._predict(i, x)

    def _units(self, layer: int, x) -> tuple[list[int], list[float]]:
        c = self.config
        if not c.is_moe:
            return [layer], [1.0]
        experts, weights = self.fn["route"](x, self.layers[layer]["router"])
        e, w = np.from_dlpack(experts)[0], np.from_dlpack(weights)[0]
        return [layer * c.num_experts + int(k) for k in e], [float(v) for v in w]

    def _ffn_layer(self, layer: int, x, mask, pending: dict) -> None:
        """Layer ``layer``'s FFN for one token: each unit's kernels write weighted output parts."""
        units, weights = self._units(layer, x)
        for u, wt in zip(units, weights, strict=True):
            if self.mode == "naive":
                self._ffn_naive(u, x, wt)
            else:
                self._ffn_cached(u, x, self._select(u, x, mask), wt, pending)

    def _run(self, i: int, x, slots: np.ndarray, weight: float, ordered: bool = False) -> None:
        if slots.size == 0:
            return
        k = slots.size
        self._idx[:k] = slots if ordered else np.sort(slots)
        idx = self._view(self._idx[:k])
        out = self._new_part(weight)
        if self.split_kernel:  # the plan's tuned choice: gate first, then up/down of the neurons that fired
            g = self._view(self._g[:k])
            self.kernel["gate"](x, idx, self.pool_t, g)
            self.kernel["updown"](x, idx, g, self._thr_t[i], self.pool_t, out)
        else:
            self.kernel["fused"](x, idx, self._thr_t[i], self.pool_t, out)

    def _ffn_naive(self, i: int, x, weight: float) -> None:
        t0 = time.perf_counter()
        ids = self._all_clusters  # the unit's whole region, every record (part) checked against its CRC
        for read in self._part_reads(i, ids, ids, range(len(self.flash.part_bytes))):
            self.reader.read(*read)
        self._stall += time.perf_counter() - t0
        self.kernel["dense"](x, self._thr_t[i], self.pool_t, self._new_part(weight))

    def _part_reads(self, i: int, clusters: np.ndarray, slots: np.ndarray, parts,
                    table: np.ndarray | None = None) -> list[tuple]:
        """``FlashReader.read`` arguments reading ``parts`` of unit ``i``'s records ``clusters`` (sorted) into
        rows ``slots`` of ``table`` (default: the pool, as bytes): (offsets, destinations, CRCs, part bytes) per
        part."""
        fl, flat = self.flash, self._pool_bytes if table is None else table
        clusters = np.asarray(clusters, np.int64)
        out = []
        for p in parts:
            pb, skip = fl.part_bytes[p], fl.part_skip[p]
            offs = fl.part_base(i, p) + clusters * pb
            out.append((offs, RecordRows(flat, np.asarray(slots, np.int64), skip), self.crcs[i, clusters, p], pb))
        return out

    def _issue(self, i: int, miss: np.ndarray, keep: np.ndarray, partial: bool = False,
               gate_only: bool = False) -> list:
        """Assign slots to missing clusters and submit their reads; returns [(futures, slots)].
        ``partial``: read only as many as there are evictable slots (prefetch); ``gate_only``: split records'
        gate parts."""
        if miss.size == 0:
            return []
        victims = self.cache.victims(i, miss.size, keep)
        if len(victims) < miss.size:
            if not partial:
                raise XpucError("internal: cold segment smaller than one token's misses")
            miss = miss[: len(victims)]
            if miss.size == 0:
                return []
        slots = np.asarray(victims[: miss.size], np.int32)
        self.cache.assign(i, miss, slots, complete=not gate_only)
        parts = [0] if gate_only else range(len(self.flash.part_bytes))
        return [([self.reader.submit(*r) for r in self._part_reads(i, miss, slots, parts)], slots)]

    def _wait(self, jobs: list) -> None:
        t0 = time.perf_counter()
        for futs, _ in jobs:
            for fut in futs:
                fut.result()
        self._stall += time.perf_counter() - t0

    def _ffn_cached(self, i: int, x, need: np.ndarray, weight: float, pending: dict) -> None:
        seg = self.cache.layers[i]
        if i in pending:
            self._wait(pending.pop(i))  # prefetched reads land before their slots can be reused
        hit_slots, miss = self.cache.lookup(i, need)
        if self.exact and (miss.size or not self.cache.complete[hit_slots].all()):
            self._ffn_exact(i, x, hit_slots, miss, need, weight)  # else every record is whole in memory
            return
        if miss.size == 0:  # every cluster resident (the common case with a large budget): compute, done
            self._run(i, x, hit_slots, weight, ordered=True)
            return
        room = seg.n_cold - int((hit_slots >= seg.cold_start).sum())
        pipelined = self.mode == "full"
        if miss.size <= room:  # one wave; resident clusters stay protected
            jobs = self._issue(i, miss, need)
            if pipelined:  # compute what is resident while the reads are in flight, then what arrived
                self._run(i, x, hit_slots, weight)
                self._wait(jobs)
                for _, ss in jobs:
                    self._run(i, x, ss, weight)
            else:
                self._wait(jobs)
                self._run(i, x, np.concatenate([hit_slots, *[ss for _, ss in jobs]]), weight)
            return
        # more misses than free cold slots: compute the resident clusters, then stream the misses through
        # the whole cold segment wave by wave (each wave computed before its slots are reused)
        self._run(i, x, hit_slots, weight)
        for a in range(0, miss.size, max(seg.n_cold, 1)):
            part = miss[a:a + seg.n_cold]
            jobs = self._issue(i, part, part)
            self._wait(jobs)
            self._run(i, x, np.concatenate([ss for _, ss in jobs]), weight)

    def _gate(self, x, slots: np.ndarray, idx: np.ndarray, g: np.ndarray) -> np.ndarray:
        """Gate pre-activations (k,) of ``slots``, computed in the buffers ``idx`` and ``g``."""
        k = slots.size
        if k:
            idx[:k] = slots
            self.kernel["gate"](x, self._view(idx[:k]), self.pool_t, self._view(g[:k]))
        return g[:k, 0]

    def _updown(self, i: int, x, slots: np.ndarray, g: np.ndarray, weight: float) -> None:
        """Up/down of the fired neurons in ``slots`` (their gate values ``g``) into a new output part."""
        k = slots.size
        if k:
            self._idx_fired[:k], self._g_fired[:k] = slots, g
            self.kernel["updown"](x, self._view(self._idx_fired[:k]), self._view(self._g_fired[:k]), self._thr_t[i],
                                  self.pool_t, self._new_part(weight))

    def _ffn_exact(self, i: int, x, hit_slots: np.ndarray, miss: np.ndarray, need: np.ndarray, weight: float) -> None:
        """Split records: gate rows of the missing clusters read, every gate computed, then up/down rows read only
        for the neurons that fired and are not yet whole in memory (PowerInfer-2's exact up/down masks: exact for
        the ReLU kinds, by the threshold for SwiGLU). Misses beyond the cold segment's free slots go in waves,
        each finished before its slots are reused. ``full`` computes the resident neurons while the first wave's
        gate rows are read, and the whole ones' up/down while the others' up/down rows are read."""
        seg = self.cache.layers[i]
        room = seg.n_cold - int((hit_slots >= seg.cold_start).sum())
        first, rest = miss[:room], miss[room:]
        jobs = self._issue(i, first, need, gate_only=True)  # the resident clusters stay protected
        new = jobs[0][1] if jobs else first[:0].astype(np.int32)
        if self.mode == "full":
            self._exact_slots(i, x, hit_slots, weight)
            self._wait(jobs)
            self._exact_slots(i, x, new, weight)
        else:
            self._wait(jobs)
            self._exact_slots(i, x, np.concatenate([hit_slots, new]), weight)
        for a in range(0, rest.size, max(seg.n_cold, 1)):
            part = rest[a:a + seg.n_cold]
            jobs = self._issue(i, part, part, gate_only=True)
            self._wait(jobs)
            self._exact_slots(i, x, jobs[0][1], weight)

    def _exact_slots(self, i: int, x, slots: np.ndarray, weight: float) -> None:
        """Gate over ``slots`` (gate rows resident), then up/down of the fired ones, reading the up/down rows of
        those not yet whole (``full``: overlapped with the whole ones' up/down)."""
        if slots.size == 0:
            return
        g = self._gate(x, slots, self._idx, self._g)
        fired = self._fires(i, g)
        self._fired += int(fired.sum())
        fs, fg = slots[fired], g[fired][:, None].copy()
        whole = self.cache.complete[fs]
        if whole.all():
            self._updown(i, x, fs, fg, weight)
            return
        todo, tg = fs[~whole], fg[~whole]
        order = np.argsort(self.cache.owner[todo], kind="stable")  # reads in file order
        todo, tg = todo[order], tg[order]
        futs = [self.reader.submit(*r) for r in self._part_reads(i, self.cache.owner[todo], todo, [1])]
        if self.mode == "full":  # up/down of the whole ones while the others' rows are read
            self._updown(i, x, fs[whole], fg[whole], weight)
            self._wait([(futs, todo)])
            self._updown(i, x, todo, tg, weight)
        else:
            self._wait([(futs, todo)])
            self._updown(i, x, np.concatenate([fs[whole], todo]), np.concatenate([fg[whole], tg]), weight)
        self.cache.complete[todo] = True

    def _fires(self, i: int, g: np.ndarray) -> np.ndarray:
        """Which gate pre-activations fire (the kernels' own test: ``g > 0``; SwiGLU ``|silu(g)| > threshold``)."""
        if self.flash.kind == "swiglu":
            with np.errstate(over="ignore"):
                return np.abs(g / (1.0 + np.exp(-g))) > self._thr[i]
        return g > 0

    def _prefetch(self, layer: int, h, ys, yw, pending: dict) -> None:
        """Predict layer ``layer``'s clusters (of its routed experts, for MoE) from the hidden state before
        attention and start their reads."""
        x = self.fn["pre_norm"](h, ys, yw, self.layers[layer]["ffn_norm"])
        for i in self._units(layer, x)[0]:
            if self.cache.layers[i].n_cold == 0:
                continue
            guess = self._select(i, x, None)
            slots = self.cache.layers[i].slot_of[guess]
            miss = guess[slots < 0][: self.cache.layers[i].n_cold // 2]
            pending[i] = self._issue(i, miss, guess, partial=True, gate_only=self.exact)

    # --- a batch of tokens (prefill) ----------------------------------------------------------------------
    def _ffn_layer_batch(self, layer: int, x: np.ndarray) -> np.ndarray:
        """Layer ``layer``'s dense FFN for a batch (T, d); MoE: each expert on the tokens routed to it."""
        from threadpoolctl import threadpool_limits

        c = self.config
        with threadpool_limits(self._blas_threads, user_api="blas"):
            if not c.is_moe:
                return self._ffn_dense_batch(layer, x)
            experts, weights = self.fn["route"](self._tensor(x.reshape(-1), self._dev), self.layers[layer]["router"])
            top, w = np.from_dlpack(experts), np.from_dlpack(weights)
            y = np.zeros_like(x)
            for e in np.unique(top):
                rows = np.flatnonzero((top == e).any(axis=1))
                scale = (w[rows] * (top[rows] == e)).sum(axis=1, keepdims=True).astype(np.float32)
                y[rows] += scale * self._ffn_dense_batch(layer * c.num_experts + int(e), x[rows])
            return y

    def _ffn_dense_batch(self, i: int, x: np.ndarray) -> np.ndarray:
        """Dense FFN of unit ``i`` for a batch ``x`` (T, d), over chunks of its clusters fetched once: for up to
        ``FEW_TOKENS`` tokens the compiled dense neuron-cluster kernel runs on each chunk once per token (the
        chunk stays in cache), for more the chunk is dequantized by the compiled kernel and multiplied by
        numpy/BLAS."""
        fl = self.flash
        chunks = self._prefill_buffer()
        layout = fl.bundle_layout(1)
        y = np.zeros_like(x)
        few = x.shape[0] <= FEW_TOKENS
        if few:
            xs, part = aligned_empty(x.shape, "float32"), aligned_empty(x.shape, "float32")
            xs[...] = x
            x_t, part_t = [self._view(r) for r in xs], [self._view(r) for r in part]
        per = chunks.shape[1]
        spans = [np.arange(a, min(a + per, fl.n_clusters), dtype=np.int64) for a in range(0, fl.n_clusters, per)]
        pending = self._fetch_clusters(i, spans[0], chunks[0, :spans[0].size], wait=False)
        try:
            for k, ids in enumerate(spans):  # the next chunk's reads in flight while this one is computed
                for f in pending:
                    f.result()
                buf = chunks[k % 2, :ids.size]
                pending = [] if k + 1 == len(spans) else self._fetch_clusters(
                    i, spans[k + 1], chunks[(k + 1) % 2, :spans[k + 1].size], wait=False)
                if few:
                    records = self._view(buf)
                    for t in range(x.shape[0]):
                        self.kernel["dense"](x_t[t], self._thr_t[i], records, part_t[t])
                    y += part
                    continue
                w = self._dequantize(buf).reshape(-1, layout.rows, layout.d_model)
                g = x @ w[:, 0].T
                u = x @ w[:, 1].T if layout.gated else None
                y += activation(layout.kind, g, u, self._thr[i]).astype(np.float32) @ w[:, -1]
        finally:  # an error or Ctrl-C: the reads still in flight finish before the buffers are reused
            for f in pending:
                f.cancel() or f.exception()
        return y

    def _dequantize(self, records: np.ndarray) -> np.ndarray:
        n = records.shape[0]
        if n not in self._dequant_out:
            lay = self.flash.bundle_layout(n)
            out = aligned_empty((n, lay.cluster, lay.rows, lay.d_model), "float32")
            self._dequant_out[n] = (out, self._view(out))
        out, out_t = self._dequant_out[n]
        self.kernel["dequant"](self._view(records), out_t)
        return out

    def _fetch_clusters(self, i: int, ids: np.ndarray, dest: np.ndarray, wait: bool = True) -> list:
        """Records of layer ``i``'s clusters ``ids`` (sorted) into ``dest``: from the cache when resident. With
        ``wait=False`` the reads are queued on the reader's I/O thread and their futures returned."""
        missing = np.ones(ids.size, bool)
        if self.cache is not None:
            slots = self.cache.layers[i].slot_of[ids]
            missing = slots < 0
            missing[~missing] = ~self.cache.complete[slots[~missing]]  # a split record's gate part alone: read
            dest[~missing] = self.cache.pool[slots[~missing]]
        if missing.any():
            flat = dest.reshape(dest.shape[0], -1).view(np.uint8)
            reads = self._part_reads(i, ids[missing], np.flatnonzero(missing), range(len(self.flash.part_bytes)), flat)
            if not wait:
                return [self.reader.submit(*read) for read in reads]
            for read in reads:
                self.reader.read(*read)
        return []

    def _prefill_buffer(self) -> np.ndarray:
        """The prefill's two aligned staging buffers of cluster chunks (each about PREFILL_CHUNK_BYTES dequantized):
        one is read into while the other is computed."""
        if self._prefill_chunk_buf is None:
            fl = self.flash
            layout = fl.bundle_layout(1)
            per_cluster = fl.cluster * layout.rows * layout.d_model * 4  # float32 after dequantization
            n = int(min(fl.n_clusters, max(1, PREFILL_CHUNK_BYTES // per_cluster)))
            self._prefill_chunk_buf = aligned_empty((2, n, *layout.shape()[1:]), layout.storage_dtype)
        return self._prefill_chunk_buf
