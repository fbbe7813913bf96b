"""xpuc.compiler: model files in, compiled artifacts out (frontends, Relax model, passes, CLI)."""

from xpuc.runtime.threads import configure_tvm_threads as _configure_tvm_threads

_configure_tvm_threads()
