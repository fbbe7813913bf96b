"""Drive a compiled decoder module: paged KV cache, prefill, decode, one sequence at a time."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import tvm
from tvm.runtime import ShapeTuple
from tvm.runtime.vm import VirtualMachine

from xpuc.compiler.errors import XpucError

PAGE_SIZE = 16  # the CPU paged-KV kernels require 16


class DecoderSession:
    """One generation context over a loaded Relax VM executable.

    Parameters
    ----------
    executable:
        ``tvm.runtime.Module`` / ``relax.VMExecutable`` with ``prefill``, ``decode``,
        ``create_paged_kv_cache``.
    params:
        Weights in the packing order of the export (list of ``tvm.runtime.Tensor``).
    max_context:
        Tokens the KV cache can hold (prompt + generated).
    prefill_chunk:
        Longest prompt piece given to ``prefill`` at once; longer prompts are chunked.
    """

    def __init__(self, executable, params: Sequence, max_context: int = 2048, prefill_chunk: int = 256) -> None:
        self.dev = tvm.cpu()
        self.vm = VirtualMachine(executable, self.dev)
        self.params = list(params)
        self.max_context = max_context
        self.prefill_chunk = prefill_chunk
        self._add_seq = tvm.get_global_func("vm.builtin.kv_state_add_sequence")
        self._remove_seq = tvm.get_global_func("vm.builtin.kv_state_remove_sequence")
        self._begin = tvm.get_global_func("vm.builtin.kv_state_begin_forward")
        self._end = tvm.get_global_func("vm.builtin.kv_state_end_forward")
        self.kv = self.vm["create_paged_kv_cache"](
            ShapeTuple([1]), ShapeTuple([max_context]), ShapeTuple([prefill_chunk]),
            ShapeTuple([PAGE_SIZE]), ShapeTuple([0]))
        self.position = 0
        self._has_seq = False
        self.reset()

    def reset(self) -> None:
        if self._has_seq:
            self._remove_seq(self.kv, 0)
        self._add_seq(self.kv, 0)
        self._has_seq = True
        self.position = 0

    def _step(self, fn: str, ids: np.ndarray) -> np.ndarray:
        n = ids.shape[1]
        if self.position + n > self.max_context:
            raise XpucError(f"context full: {self.position + n} tokens exceed the KV cache's "
                            f"{self.max_context} (raise --max-context)")
        self._begin(self.kv, ShapeTuple([0]), ShapeTuple([n]))
        logits, self.kv = self.vm[fn](tvm.runtime.tensor(ids, self.dev), self.kv, self.params)
        self._end(self.kv)
        self.position += n
        return logits.numpy()[0, -1]

    def prefill(self, ids: Sequence[int]) -> np.ndarray:
        """Feed prompt tokens; returns the logits after the last one (float32, (vocab,))."""
        arr = np.asarray(ids, dtype=np.int32).reshape(1, -1)
        if arr.shape[1] == 0:
            raise XpucError("empty prompt: nothing to prefill")
        logits = None
        for s in range(0, arr.shape[1], self.prefill_chunk):
            logits = self._step("prefill", arr[:, s:s + self.prefill_chunk])
        return logits

    def decode(self, token: int) -> np.ndarray:
        """Feed one token; returns the next-token logits."""
        return self._step("decode", np.array([[token]], dtype=np.int32))
