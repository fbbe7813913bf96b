"""xpuc.targets: device profiles, TVM targets and toolchains."""

from xpuc.runtime.threads import configure_tvm_threads

configure_tvm_threads()
