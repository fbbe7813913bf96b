"""Offline planner: from model, profile statistics, device profile and memory budget to a plan.

Decisions (each explained in ``Plan.explain()``):

* **Fixed segment** (always resident): embeddings, attention, norms, LM head, KV cache for the context.
* **Hot segment**: the FFN neurons with the highest firing frequency, across all layers, as long as they
  fit. Every neuron record has the same size, so choosing the most frequent ones maximises the expected
  number of cache hits per token *exactly* (0/1 knapsack with equal weights: any other choice can be
  improved by swapping in a more frequent neuron). Hot neurons are grouped into clusters of ``C``.
* **Cold cache**: a share of what remains of the budget (``cold_share``), LRU at run time; the expected
  reads assume it holds the next most frequent neurons.
* **Flash reads**: block size = neuron record size rounded up to 4 KiB (one O_DIRECT read per bundle);
  queue depth from the device's read curve: on a measured curve (``xpuc targets --measure-flash``, the host)
  the smallest depth whose random-read throughput at that block size reaches 80 % of the best depth's; on a
  published curve (phones: one point per block size) enough depth to make up for the block size's shortfall.
* **Processors**: prefill on the NPU or GPU of the profile (GPU while the NPU path is not wired in);
  decode on the big and mid CPU cores, one big core reserved for I/O (the paper's measurement: a big core
  issues UFS reads best).

A budget below the fixed segment plus one cluster per layer is an error that states the minimum.
"""

from __future__ import annotations

import numpy as np

from xpuc.runtime.errors import XpucError
from xpuc.runtime.formats.arch import ArchConfig
from xpuc.runtime.formats.plan import Plan
from xpuc.runtime.formats.profile_stats import ProfileStats
from xpuc.targets.flash_curve import nearest_point

_BYTES = {"float32": 4.0, "float16": 2.0, "q4_0": 18 / 32, "q4_1": 20 / 32}


def fixed_bytes(config: ArchConfig, weight_dtype: str, context: int) -> int:
    c = config
    per = _BYTES[weight_dtype]
    attn = c.num_layers * (c.hidden_size * (c.num_heads + 2 * c.num_kv_heads) * c.head_dim
                           + c.num_heads * c.head_dim * c.hidden_size) * per
    emb = c.vocab_size * c.hidden_size * 2.0 * (1 if c.tie_embeddings else 2)  # fp16 table (+ head)
    norms = (2 * c.num_layers + 1) * c.hidden_size * 4
    kv = 2 * c.num_layers * c.num_kv_heads * c.head_dim * context * 2  # fp16 K and V
    routers = c.num_layers * c.num_experts * c.hidden_size * 2  # fp16 (MoE)
    return int(attn + emb + norms + kv + routers)


def _queue_depth(profile, block: int) -> int:
    """From a measured curve (points per queue depth): the smallest depth that reaches 80 % of the best
    throughput at the nearest block size. From a published curve (one point per block size): enough depth to
    make up for the block size's shortfall against the best block size."""
    curve = profile.flash.get("read_curve", [])
    if not curve:
        return 4
    kib = block / 1024
    if all("queue_depth" in p for p in curve):
        near = nearest_point(curve, kib)["block_kib"]
        same = sorted((p for p in curve if p["block_kib"] == near), key=lambda p: p["queue_depth"])
        best = max(p["random_mbps"] for p in same)
        return int(next(p["queue_depth"] for p in same if p["random_mbps"] >= 0.8 * best))
    best = max(p["random_mbps"] for p in curve)
    near = min(curve, key=lambda p: abs(p["block_kib"] - kib))
    ratio = max(best / max(near["random_mbps"], 1), 1.0)
    return int(min(32, max(1, np.ceil(ratio * 2))))


def plan_neurons(config: ArchConfig, stats: ProfileStats, profile, budget_bytes: int, weight_dtype: str = "q4_0",
                 cluster: int = 32, context: int = 2048, cold_share: float = 0.1,
                 fingerprint: str | None = None) -> Plan:
    """Place every FFN neuron (hot or cold) under ``budget_bytes``; see the module docstring.

    ``fingerprint`` (ModelSpec.fingerprint), when given, must be the one ``stats`` were recorded on.
    """
    stats.check_matches(config, "--stats", fingerprint)
    if weight_dtype not in _BYTES:
        raise XpucError(f"unknown weight dtype '{weight_dtype}' (known: {', '.join(_BYTES)})")
    record = int(np.ceil(3 * config.hidden_size * _BYTES[weight_dtype]))
    fixed = fixed_bytes(config, weight_dtype, context)
    minimum = fixed + config.ffn_units * cluster * record
    if budget_bytes < minimum:
        raise XpucError(f"memory budget {budget_bytes / 2**20:.0f} MiB is below the minimum of "
                        f"{minimum / 2**20:.0f} MiB for this model ({fixed / 2**20:.0f} MiB fixed segment + one "
                        f"neuron cluster per {'expert' if config.is_moe else 'layer'})")
    freq = np.asarray(stats.frequency, dtype=np.float64)  # (L, F)
    L, F = freq.shape
    spare = budget_bytes - fixed
    cold_cache = int(min(spare * cold_share, F * L * record))
    n_hot = min((spare - cold_cache) // record, L * F)
    cold_cache = int(min(cold_cache, (L * F - n_hot) * record))  # no cache for neurons that are all hot
    order = np.argsort(-freq, axis=None, kind="stable")  # most frequent neuron first, all layers
    hot_flat = order[:n_hot]
    n_cache = min(cold_cache // record, L * F - n_hot)
    cached = order[n_hot:n_hot + n_cache]
    hot = [[] for _ in range(L)]
    for idx in hot_flat:
        hot[idx // F].append(int(idx % F))
    total = freq.sum()
    hit = (freq.flat[hot_flat].sum() + freq.flat[cached].sum()) / total if total > 0 else 1.0
    miss_freq = total - freq.flat[hot_flat].sum() - freq.flat[cached].sum()
    block = int(np.ceil(record / 4096) * 4096)
    n_cores = sum(c.count for c in profile.clusters)
    big_mid = sum(c.count for c in profile.clusters if c.cls in ("big", "mid")) or n_cores
    prefill = "gpu" if profile.gpu and not profile.is_host else "cpu"  # as `xpuc compile --prefill-on auto`
    return Plan(
        device=profile.name, budget_bytes=int(budget_bytes), weight_dtype=weight_dtype, cluster=cluster,
        fixed_bytes=fixed, record_bytes=record, hot_neurons=[sorted(h) for h in hot], cold_cache_bytes=cold_cache,
        read_block_bytes=block, queue_depth=_queue_depth(profile, block),
        compute_threads=big_mid if miss_freq == 0 else max(1, big_mid - 1), io_threads=1, prefill_on=prefill,
        decode_on="cpu",
        expected_hit_rate=float(hit), expected_read_bytes_per_token=float(miss_freq * block),
        model=config.to_dict(), fingerprint=stats.fingerprint)
