"""Run a compiled ONNX graph artifact."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import numpy as np

from xpuc.runtime.artifact import read_manifest, verify
from xpuc.runtime.errors import XpucError


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
        self.buckets = set(self.manifest.io.get("buckets", []))
        self._dim_at = self._find_symbolic_axis()
        self._vm = VirtualMachine(tvm.runtime.load_module(str(self.path / module.file)), tvm.cpu())
        self.last_function = ""

    def _find_symbolic_axis(self) -> tuple[int, int] | None:
        """(input index, axis) of the graph's symbolic dim, which the sequence buckets bind."""
        for i, inp in enumerate(self.manifest.io.get("inputs", [])):
            for ax, d in enumerate(inp.get("shape", [])):
                if isinstance(d, str) and d:
                    return i, ax
        return None

    def function_for(self, arrays) -> str:
        """``main_seq<n>`` (tuned, static) when the input length ``n`` is a bucket, else ``main``."""
        if self.buckets and self._dim_at is not None:
            i, ax = self._dim_at
            n = int(np.shape(arrays[i])[ax])
            if n in self.buckets:
                return f"main_seq{n}"
        return "main"

    def __call__(self, *arrays: np.ndarray) -> list[np.ndarray]:
        import tvm

        if len(arrays) != len(self.inputs):
            raise XpucError(f"the graph takes {len(self.inputs)} inputs ({', '.join(self.inputs)}), got {len(arrays)}")
        self.last_function = self.function_for(arrays)
        out = self._vm[self.last_function](*[tvm.runtime.tensor(np.ascontiguousarray(a)) for a in arrays])
        return [out.numpy()] if hasattr(out, "numpy") else [o.numpy() for o in out]
