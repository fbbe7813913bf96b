"""ReplaceCPUAttention: TVM's single-threaded CPU attention kernels of the paged KV cache swapped for xpuc's.

``TIRPagedKVCache`` (``relax.frontend.nn.llm``) hands the cache its attention kernels as functions of the module:
on an LLVM target ``batch_prefill_ragged_kv``, ``batch_prefill_paged_kv_cpu`` and ``batch_decode_paged_kv_cpu``
(``tir_attention_*_cpu`` before ``nn`` export names them by their symbols). Those are scalar loops on one thread.
This pass replaces each with the kernel of :mod:`xpuc.schedules.attention_cpu` that has the same signature and
semantics (parallel over query rows and heads, vectorized over the head dimension), for float32 caches whose head
dimension is a multiple of 16. The sliding-window and tree-mask variants are left as they are.
"""

from __future__ import annotations

import tvm
from tvm import tirx

from xpuc.schedules.attention_cpu import (
    LANES,
    attention_decode_paged,
    attention_prefill_paged,
    attention_prefill_ragged,
)

_RAGGED = (0, 2, lambda h_kv, h_q, d, _ps: attention_prefill_ragged(h_kv, h_q, d))
_PAGED = (0, 2, attention_prefill_paged)
_DECODE = (0, 1, attention_decode_paged)
#: the cache's kernel (by the name ``TIRPagedKVCache`` gives it, or its global symbol once exported) -> (index of
#: the query buffer's parameter, of the key buffer's, builder of the replacement)
KERNELS = {
    "tir_attention_prefill_ragged_cpu": _RAGGED, "batch_prefill_ragged_kv": _RAGGED,
    "tir_attention_prefill_cpu": _PAGED, "batch_prefill_paged_kv_cpu": _PAGED,
    "tir_attention_decode_cpu": _DECODE, "batch_decode_paged_kv_cpu": _DECODE,
}


def _shape(func: tirx.PrimFunc, index: int) -> tuple[list, str]:
    buf = func.params[index]  # TVM 0.27: a buffer parameter carries its shape
    return list(buf.shape), str(buf.dtype)


@tvm.transform.module_pass(opt_level=0, name="xpuc.ReplaceCPUAttention")
class ReplaceCPUAttention:
    """Replace the paged KV cache's CPU attention kernels (see the module docstring).

    A kernel is replaced only when its query buffer is float32 with a static head count and head dimension (a
    multiple of 16) and the replacement has the same number of parameters; otherwise TVM's stays. Replaced
    functions carry ``tirx.is_scheduled``, so the schedule phase leaves them alone.
    """

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        updates = {}
        for gv, func in mod.functions.items():
            entry = KERNELS.get(gv.name_hint)
            if entry is None or not isinstance(func, tirx.PrimFunc):
                continue
            q_at, k_at, builder = entry
            (_, h_q, d), dtype = _shape(func, q_at)
            k_shape, _ = _shape(func, k_at)
            h_kv = k_shape[1] if len(k_shape) == 3 else k_shape[2]
            page_size = k_shape[3] if len(k_shape) == 5 else tirx.IntImm("int64", 16)
            dims = (h_kv, h_q, d, page_size)
            if dtype != "float32" or not all(isinstance(v, tirx.IntImm) for v in dims) or int(d) % LANES:
                continue
            new = builder(*(int(v) for v in dims))
            if len(new.params) != len(func.params):
                continue
            symbol = func.attrs.get("global_symbol") if func.attrs is not None else None
            updates[gv] = new.with_attr("global_symbol", str(symbol)) if symbol else new  # private stays private
        if not updates:
            return mod
        mod = mod.clone()
        for gv, new in updates.items():
            mod[gv] = new
        return mod
