"""Hand a sequence's KV cache from the prefill module (GPU/NPU) to the decode module (CPU).

Prefill and decode are separate compiled modules with separate paged KV caches: prefill runs where the
device profile puts it and fills its cache; decode continues on the CPU from the same positions. The
caches are TVM ``PagedAttentionKVCache`` objects; TVM's checkpoint API exports a sequence one page group
(one layer) at a time and imports it into another cache of the same layout (same layers, heads, head dim,
page size, dtype and RoPE — the capacities may differ). The layout hash is compared first so that a
mismatch is one clear error instead of a failure inside TVM.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

from xpuc.runtime.errors import XpucError


@dataclass
class HandoffStats:
    """What one hand-off moved."""

    tokens: int
    layers: int
    bytes: int
    seconds: float


def _f(name: str):
    import tvm

    return tvm.get_global_func(f"vm.builtin.attention_kv_cache_{name}")


def kv_layout_hash(cache) -> str:
    """The layout hash TVM uses to decide whether two caches can exchange pages."""
    return str(_f("get_layout_hash")(cache))


def hand_off_kv(src, dst, seq_id: int = 0, src_device=None) -> HandoffStats:
    """Copy sequence ``seq_id`` of KV cache ``src`` into ``dst`` (where the sequence must not exist yet).

    Parameters
    ----------
    src, dst:
        Paged KV caches created by the prefill and the decode module.
    seq_id:
        The sequence to move; after the call ``dst`` holds it at the same length.
    src_device:
        Device of ``src``'s pages (a staging tensor is allocated there, then copied to the CPU);
        ``None`` for the CPU.

    Returns
    -------
    HandoffStats
        tokens, layers and bytes moved, and the time it took.
    """
    import tvm

    t0 = time.perf_counter()
    if kv_layout_hash(src) != kv_layout_hash(dst):
        raise XpucError("the prefill and decode modules' KV caches have different layouts "
                        "(layers, heads, head size, page size, dtype or RoPE); recompile both from one model")
    meta_json = _f("get_checkpoint_metadata")(src, seq_id)
    meta = json.loads(meta_json)
    cpu = tvm.cpu()
    src_device = src_device or cpu
    export, import_ = _f("export_page_group"), _f("import_page_group")
    _f("prepare_import")(dst, seq_id, meta_json)
    moved = 0
    for group in meta["groups"]:
        shape = tuple(group["shape"])
        staged = tvm.runtime.empty(shape, group["dtype"], device=src_device)
        export(src, seq_id, group["group_index"], staged)
        host = staged if src_device.dlpack_device_type() == cpu.dlpack_device_type() else staged.copyto(cpu)
        import_(dst, seq_id, group["group_index"], host)
        moved += int(group["nbytes"])
    _f("finish_import")(dst, seq_id)
    return HandoffStats(tokens=int(meta["seq_length"]), layers=len(meta["groups"]), bytes=moved,
                        seconds=time.perf_counter() - t0)
