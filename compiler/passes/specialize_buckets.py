"""SpecializeSequenceBuckets: static-shape copies of a graph function for chosen sequence lengths.

Tuned schedules are recorded for static shapes (meta_schedule cannot tune a kernel whose loop extents are
symbolic). For each bucket ``b`` this pass adds ``<func>_seq<b>``: the function with its symbolic sequence
dim bound to ``b`` (``relax.transform.BindSymbolicVars``), next to the symbolic original, which stays for
every other length. After legalization each copy's kernels have the static shapes that
``xpuc tune --buckets`` extracted, so :class:`~xpuc.compiler.passes.apply_tuning_database.ApplyTuningDatabase`
finds their records. The runtime calls ``<func>_seq<b>`` when the input's length is ``b``.
"""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.relax.utils import copy_with_new_vars


def bucket_name(func: str, bucket: int) -> str:
    return f"{func}_seq{bucket}"


@tvm.transform.module_pass(opt_level=0, name="xpuc.SpecializeSequenceBuckets")
class SpecializeSequenceBuckets:
    """Add ``<func>_seq<b>`` for every bucket ``b``.

    Parameters
    ----------
    buckets:
        Sequence lengths to specialize for.
    func:
        The Relax function to copy (default ``main``). It must have exactly one symbolic dim; a function
        without any is left alone (nothing to specialize).
    """

    def __init__(self, buckets: tuple[int, ...], func: str = "main") -> None:
        self.buckets = tuple(sorted(set(int(b) for b in buckets)))
        self.func = func

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        if self.func not in [gv.name_hint for gv in mod.get_global_vars()]:
            return mod
        dims = sorted({v.name for v in relax.analysis.defined_symbolic_vars(mod[self.func])})
        if not dims or not self.buckets:
            return mod
        if len(dims) > 1:
            raise ValueError(f"{self.func} has several symbolic dims ({', '.join(dims)}); buckets bind one")
        bb = relax.BlockBuilder(mod.clone())
        for b in self.buckets:
            name = bucket_name(self.func, b)
            single = tvm.IRModule({self.func: mod[self.func]})
            bound = relax.transform.BindSymbolicVars({dims[0]: b}, func_name=self.func)(single)[self.func]
            bb.add_func(copy_with_new_vars(bound).with_attr("global_symbol", name), name)
        return bb.get()
