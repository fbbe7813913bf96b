"""Run a compiled ONNX graph artifact."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import numpy as np

from xpuc.compiler.errors import XpucError
from xpuc.runtime.artifact import read_manifest, verify


class GraphRunner:
    """Load a ``kind: graph`` artifact (checked) and call it with numpy inputs in graph-input order."""

    def __init__(self, artifact: str | os.PathLike) -> None:
        import tvm
        from tvm.runtime.vm import VirtualMachine

        self.path = Path(artifact)
        self.manifest = read_manifest(self.path)
        if self.manifest.kind != "graph":
            raise XpucError(f"{self.path}: not an ONNX graph artifact (kind '{self.manifest.kind}')")
        verify(self.path, self.manifest)
        module = self.manifest.modules[0]
        if module.mtriple.split("-")[0] != platform.machine() or "android" in module.mtriple:
            raise XpucError(f"{self.path}: compiled for {module.mtriple}; this machine is {platform.machine()}")
        if '"kind":"llvm"' not in module.target:
            raise XpucError(f"{self.path}: compiled for a GPU; this runtime executes CPU builds only")
        self.inputs = [i["name"] for i in self.manifest.io.get("inputs", [])]
        self._vm = VirtualMachine(tvm.runtime.load_module(str(self.path / module.file)), tvm.cpu())

    def __call__(self, *arrays: np.ndarray) -> list[np.ndarray]:
        import tvm

        if len(arrays) != len(self.inputs):
            raise XpucError(f"the graph takes {len(self.inputs)} inputs ({', '.join(self.inputs)}), got {len(arrays)}")
        out = self._vm["main"](*[tvm.runtime.tensor(np.ascontiguousarray(a)) for a in arrays])
        return [out.numpy()] if hasattr(out, "numpy") else [o.numpy() for o in out]
