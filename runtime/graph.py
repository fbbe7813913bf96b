"""Run a compiled ONNX graph artifact."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import numpy as np

from xpuc.runtime.artifact import member_path, read_manifest, verify
from xpuc.runtime.errors import XpucError
from xpuc.runtime.graph_builtins import register_missing
from xpuc.runtime.weights import load_tensors

BFLOAT16 = 16  # ONNX TensorProto.BFLOAT16


class GraphRunner:
    """Load a ``kind: graph`` artifact (checked) and call it with numpy inputs in graph-input order."""

    def __init__(self, artifact: str | os.PathLike) -> None:
        import tvm
        from tvm.runtime.vm import VirtualMachine

        self.path = Path(artifact)
        self.manifest = read_manifest(self.path)
        if self.manifest.kind != "graph":
            raise XpucError(f"{self.path}: not an ONNX graph artifact (kind '{self.manifest.kind}')")
        weights = self.manifest.weights_file
        verify(self.path, self.manifest, streamed=(weights,) if weights else ())  # weights: checked as read
        module = self.manifest.modules[0]
        if module.mtriple.split("-")[0] != platform.machine() or "android" in module.mtriple:
            raise XpucError(f"{self.path}: compiled for {module.mtriple}; this machine is {platform.machine()}")
        if '"kind":"llvm"' not in module.target:
            raise XpucError(f"{self.path}: compiled for a GPU; this runtime executes CPU builds only")
        self.inputs = [i["name"] for i in self.manifest.io.get("inputs", [])]
        self.buckets = set(self.manifest.io.get("buckets", []))
        self._dim_at = self._find_symbolic_axis()
        register_missing()  # the host functions some operators call, where only the runtime library is loaded
        self._vm = VirtualMachine(tvm.runtime.load_module(str(self.path / module.file)), tvm.cpu())
        self._params = self._load_params() if weights else {}
        self.last_function = ""

    def _load_params(self) -> dict[str, list]:
        """Function name -> its constant tensors (``params.safetensors``, digest checked over the bytes read)."""
        weights = self.manifest.weights_file
        tensors = load_tensors(member_path(self.path, weights), self.manifest.files.get(weights),
                               fix="recompile the graph")
        for p in self.manifest.params:
            t = tensors.get(p["name"])
            if t is None or list(t.shape) != list(p["shape"]) or str(t.dtype) != p["dtype"]:
                raise XpucError(f"{self.path}: constant '{p['name']}' does not match the manifest")
        try:
            return {fn: [tensors[n] for n in names]
                    for fn, names in self.manifest.io.get("function_params", {}).items()}
        except KeyError as e:
            raise XpucError(f"{self.path}: constant {e} is not in {weights}") from None

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

    def _as_declared(self, k: int, a) -> np.ndarray:
        """A bfloat16 input that arrived as raw 2-byte values (an .npz without dtypes) viewed as bfloat16."""
        a = np.asarray(a)
        if a.dtype.kind == "V" and self.manifest.io["inputs"][k].get("dtype") == BFLOAT16 and a.dtype.itemsize == 2:
            return a.view(_np_dtype("bfloat16"))
        return a

    def __call__(self, *arrays: np.ndarray) -> list[np.ndarray]:
        import tvm

        if len(arrays) != len(self.inputs):
            raise XpucError(f"the graph takes {len(self.inputs)} inputs ({', '.join(self.inputs)}), got {len(arrays)}")
        arrays = [self._as_declared(k, a) for k, a in enumerate(arrays)]
        self.last_function = self.function_for(arrays)
        # np.asarray(order="C") keeps a 0-d input 0-d (np.ascontiguousarray would make it 1-d)
        out = self._vm[self.last_function](*[tvm.runtime.tensor(np.asarray(a, order="C")) for a in arrays],
                                           *self._params.get(self.last_function, []))
        return _flatten(out)


DTYPES_KEY = "__dtypes__"  # .npz entry: JSON {array name: dtype name} for dtypes .npz stores as raw bytes


def _np_dtype(name: str) -> np.dtype:
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def load_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Arrays of a .npz file, bfloat16 (stored by numpy as raw 2-byte values) restored from the
    ``__dtypes__`` entry that :func:`save_npz` writes."""
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except (OSError, ValueError, EOFError) as e:
        raise XpucError(f"{path}: not a readable .npz file ({e})") from None
    meta = arrays.pop(DTYPES_KEY, None)
    if meta is not None:
        try:
            dtypes = json.loads(str(meta))
            for k, name in dtypes.items():
                if k in arrays and arrays[k].dtype.kind == "V":
                    arrays[k] = arrays[k].view(_np_dtype(name))
        except (ValueError, TypeError, AttributeError) as e:
            raise XpucError(f"{path}: malformed {DTYPES_KEY} entry ({e})") from None
    return arrays


def save_npz(path: str | os.PathLike, arrays: dict[str, np.ndarray]) -> None:
    """Write arrays to a .npz (atomically), recording the dtypes that .npz cannot name."""
    from xpuc.runtime.artifact import atomic_path

    extra = {k: str(a.dtype) for k, a in arrays.items() if a.dtype.kind == "V" or str(a.dtype) == "bfloat16"}
    payload = dict(arrays)
    if extra:
        payload[DTYPES_KEY] = np.array(json.dumps(extra))
    with atomic_path(path, suffix=".part.npz") as tmp:
        np.savez(tmp, **payload)


def _flatten(out) -> list[np.ndarray]:
    """The graph's outputs as arrays: tensors, shapes (a graph whose output is a ``Shape``) as int64, tuples
    flattened in order."""
    if hasattr(out, "numpy"):
        return [out.numpy()]
    if type(out).__name__ == "Shape":
        return [np.array([int(d) for d in out], dtype=np.int64)]
    if isinstance(out, (int, float, bool)):
        return [np.array(out)]
    return [a for o in out for a in _flatten(o)]
