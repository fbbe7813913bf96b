"""Plan: the offline planner's decisions for one model, device and budget (``plan.json``, versioned)."""

from __future__ import annotations

from dataclasses import dataclass, field

from xpuc.runtime.formats.jsonfile import JsonRecord

PLAN_SCHEMA = 2  # 2: records the model's weights fingerprint


@dataclass
class Plan(JsonRecord):
    """The offline planner's decisions (``Plan.explain()`` says each one and why)."""

    SCHEMA, WHAT = PLAN_SCHEMA, "plan"

    device: str
    budget_bytes: int
    weight_dtype: str
    cluster: int
    fixed_bytes: int
    record_bytes: int
    hot_neurons: list[list[int]]  # per layer, sorted
    cold_cache_bytes: int
    read_block_bytes: int
    queue_depth: int
    compute_threads: int
    io_threads: int
    prefill_on: str
    decode_on: str
    expected_hit_rate: float
    expected_read_bytes_per_token: float
    model: dict = field(default_factory=dict)
    ffn_kernel: str = "fused"  # "fused" or "split" (gate, then up/down of the neurons that fired)
    fingerprint: str = ""  # ModelSpec.fingerprint of the model the statistics were recorded on
    schema: int = PLAN_SCHEMA

    @property
    def hot_bytes(self) -> int:
        return sum(len(h) for h in self.hot_neurons) * self.record_bytes

    @property
    def total_bytes(self) -> int:
        return self.fixed_bytes + self.hot_bytes + self.cold_cache_bytes


    def explain(self) -> str:
        mib = 2**20
        n_hot = sum(len(h) for h in self.hot_neurons)
        n_all = len(self.hot_neurons) * self.model.get("intermediate_size", 0)
        rows = [
            ("device", self.device, "profile"),
            ("budget", f"{self.budget_bytes / mib:.0f} MiB", "user"),
            ("fixed segment", f"{self.fixed_bytes / mib:.1f} MiB", "embeddings, attention, norms, head, KV cache"),
            ("hot segment", f"{self.hot_bytes / mib:.1f} MiB, {n_hot}/{n_all} neurons",
             "most frequent neurons first (exact for equal-size records)"),
            ("cold cache", f"{self.cold_cache_bytes / mib:.1f} MiB", "LRU over the remaining neurons"),
            ("neuron record", f"{self.record_bytes} B ({self.weight_dtype})", "gate | up | down column"),
            ("flash reads", f"{self.read_block_bytes // 1024} KiB blocks, queue depth {self.queue_depth}",
             "record size, device read curve"),
            ("threads", f"{self.compute_threads} compute + {self.io_threads} I/O",
             "big+mid cores; one kept for I/O unless every neuron fits in memory"),
            ("prefill / decode", f"{self.prefill_on} / {self.decode_on}", "profile XPUs"),
            ("expected FFN hit rate", f"{100 * self.expected_hit_rate:.1f} %", "profile frequencies"),
            ("expected flash reads", f"{self.expected_read_bytes_per_token / 1024:.1f} KiB/token", ""),
        ]
        w0 = max(len(r[0]) for r in rows)
        w1 = max(len(r[1]) for r in rows)
        return "\n".join(f"{a:<{w0}}  {b:<{w1}}  {c}" for a, b, c in rows)
