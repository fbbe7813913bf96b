"""xpuc.schedules: TIR kernels and their schedules."""

from xpuc.runtime.threads import configure_tvm_threads as _configure_tvm_threads

_configure_tvm_threads()
