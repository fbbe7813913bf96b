"""xpuc.runtime: artifact in, tokens out (loader, KV cache driving, sampler, tokenizer, metrics)."""

from xpuc.runtime.threads import configure_tvm_threads as _configure_tvm_threads

_configure_tvm_threads()
