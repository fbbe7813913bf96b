"""Run a Relax module's ``main`` on the host CPU target: legalized, built with the VM lowering only."""

from __future__ import annotations

import numpy as np


def run_main(mod, x: np.ndarray) -> np.ndarray:
    import tvm
    from tvm import relax

    from xpuc.targets.profile import load_profile

    target = load_profile("host").cpu_target()
    mod = relax.transform.LegalizeOps()(mod)
    with target:
        ex = tvm.compile(mod, target=target, relax_pipeline=relax.pipeline.default_build_pipeline())
    return relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()
