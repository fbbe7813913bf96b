"""Drive a compiled decoder module: paged KV cache, prefill, decode, one sequence at a time."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import tvm
from tvm.runtime import ShapeTuple
from tvm.runtime.vm import VirtualMachine

from xpuc.runtime.errors import XpucError
from xpuc.runtime.kv_handoff import HandoffStats, hand_off_kv

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
    device:
        Where the module's kernels, weights and KV cache live (default: the CPU).
    """

    def __init__(self, executable, params: Sequence, max_context: int = 2048, prefill_chunk: int = 256,
                 device=None) -> None:
        self.dev = device or tvm.cpu()
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

    def take_kv_from(self, other: DecoderSession) -> HandoffStats:
        """Replace this session's sequence with ``other``'s (its KV cache copied page group by page group)."""
        if other.position > self.max_context:
            raise XpucError(f"the prefilled {other.position} tokens exceed this session's KV cache "
                            f"({self.max_context} tokens)")
        self._remove_seq(self.kv, 0)
        self._has_seq = False
        stats = hand_off_kv(other.kv, self.kv, 0, other.dev)
        self._has_seq = True
        self.position = stats.tokens
        return stats


class SplitSession:
    """Prefill in one module (the GPU's or NPU's), decode in another (the CPU's), KV cache handed over.

    Same interface as :class:`DecoderSession`; ``last_handoff`` tells what the last prefill moved.
    """

    def __init__(self, prefill: DecoderSession, decode: DecoderSession) -> None:
        self.prefill_session = prefill
        self.decode_session = decode
        self.last_handoff: HandoffStats | None = None

    @property
    def position(self) -> int:
        return self.decode_session.position

    @property
    def max_context(self) -> int:
        return self.decode_session.max_context

    def reset(self) -> None:
        self.prefill_session.reset()
        self.decode_session.reset()

    def prefill(self, ids: Sequence[int]) -> np.ndarray:
        """Prefill on the prefill module, then hand its KV cache to the decode module."""
        if self.decode_session.position:
            raise XpucError("a split session prefills only at the start of a sequence (reset first)")
        self.prefill_session.reset()
        logits = self.prefill_session.prefill(ids)
        self.last_handoff = self.decode_session.take_kv_from(self.prefill_session)
        self.prefill_session.reset()  # free the prefill module's pages
        return logits

    def decode(self, token: int) -> np.ndarray:
        return self.decode_session.decode(token)
