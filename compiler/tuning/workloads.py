"""The tunable workloads of a dense prefill graph at static sequence-length buckets.

Prefill graphs keep the sequence length symbolic; meta_schedule tunes static shapes. For each bucket the
graph's symbolic dims are bound (``relax.transform.BindSymbolicVars``), lowered by xpuc's CPU/GPU phases up
to (not including) the schedule phase, and its PrimFuncs are extracted as tasks. The same lowering runs at
compile time (:mod:`xpuc.compiler.passes.specialize_buckets`), so a tuned record's workload matches the
kernel compiled into the artifact structurally.

Sources:

* an ONNX file (weights embedded or not);
* a model (HF directory, GGUF, bundled name): the decoder-prefill graph of its architecture
  (:func:`xpuc.compiler.onnx_export.decoder_prefill_onnx`, one layer — every layer has the same kernels —
  weights as graph inputs, so a 7B shape costs no weight memory);
* an artifact directory from ``xpuc compile`` (its source ONNX file or model config).
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import tvm
import tvm_ffi
from tvm import relax

from xpuc.compiler.frontend_onnx import read_onnx
from xpuc.compiler.frontends import load_model
from xpuc.compiler.onnx_export import decoder_prefill_onnx
from xpuc.compiler.passes.apply_tuning_database import has_symbolic_shape
from xpuc.compiler.pipeline import phases
from xpuc.runtime.errors import XpucError

DEFAULT_BUCKETS = (16, 64, 256, 512)


@dataclass
class TuningWorkload:
    """One static-shape kernel to tune: ``mod`` holds a single PrimFunc named ``main``."""

    name: str
    bucket: int
    weight: int
    mod: tvm.IRModule
    flop: float

    @property
    def key(self) -> str:
        return f"{self.name}@{self.bucket}"


def parse_buckets(text: str) -> tuple[int, ...]:
    """``"16,64,256"`` -> (16, 64, 256); one clear error for anything else."""
    try:
        vals = tuple(sorted({int(t) for t in str(text).split(",") if t.strip()}))
    except ValueError:
        raise XpucError(f"--buckets must be comma-separated token counts, got '{text}'") from None
    if not vals or any(v < 1 or v > 1 << 16 for v in vals):
        raise XpucError(f"--buckets must be token counts between 1 and 65536, got '{text}'")
    return vals


def graph_from_source(source: str | os.PathLike):
    """(ONNX ModelProto, description) for an ONNX file, a model or an artifact directory."""

    path = Path(source)
    if path.suffix == ".onnx":
        return read_onnx(path), path.name
    if path.is_dir() and (path / "manifest.json").is_file():
        from xpuc.runtime.artifact import read_manifest
        from xpuc.runtime.formats.arch import ArchConfig

        manifest = read_manifest(path)
        if manifest.kind == "graph":
            src = Path(manifest.source.get("path", ""))
            if not src.is_file():
                raise XpucError(f"{path}: its source ONNX file {src} is gone; tune the ONNX file itself")
            return read_onnx(src), src.name
        return _decoder_graph(ArchConfig.from_dict(manifest.config)), f"{path.name} (decoder prefill graph)"

    spec = load_model(source, with_tokenizer=False)
    if spec.config.is_moe:
        raise XpucError(f"{source}: a mixture-of-experts model; prefill-graph tuning covers dense models "
                        "(`xpuc tune --sparse` tunes its experts' kernels)")
    return _decoder_graph(spec.config), f"{spec.config.architecture} decoder prefill graph"


def _decoder_graph(config):

    import onnx

    one_layer = dataclasses.replace(config, num_layers=1)
    with tempfile.TemporaryDirectory() as d:
        return onnx.load(str(decoder_prefill_onnx(Path(d) / "prefill.onnx", one_layer, None)))


def symbolic_dims(mod: tvm.IRModule, func: str = "main") -> list[str]:
    return sorted({v.name for v in relax.analysis.defined_symbolic_vars(mod[func])})


def bind_bucket(mod: tvm.IRModule, bucket: int, func: str = "main") -> tvm.IRModule:
    """``mod`` with every symbolic dim of ``func`` bound to ``bucket`` (graphs with one symbolic axis)."""
    dims = symbolic_dims(mod, func)
    if len(dims) > 1:
        raise XpucError(f"the graph has several symbolic dims ({', '.join(dims)}); buckets bind one sequence axis")
    if not dims:
        return mod
    return relax.transform.BindSymbolicVars({dims[0]: bucket}, func_name=func)(mod)


def lower_for_tuning(mod: tvm.IRModule, target: tvm.target.Target) -> tvm.IRModule:
    """xpuc's phases up to the schedule phase (what the tuned kernels must match at compile time)."""

    for name, fn in phases(target):
        if name == "schedule":
            break
        mod = fn(mod)
    return mod


def extract_workloads(mod: tvm.IRModule, target: tvm.target.Target,
                      buckets: tuple[int, ...] = DEFAULT_BUCKETS) -> list[TuningWorkload]:
    """The tunable kernels of ``mod``'s ``main`` at each bucket (hand-scheduled kernels excluded); a kernel the same
    at every bucket (a graph without a sequence axis, such as an image model's) once, at the first."""
    from tvm.s_tir import meta_schedule as ms

    out: list[TuningWorkload] = []
    seen: set = set()
    for bucket in buckets:
        lowered = lower_for_tuning(bind_bucket(mod, bucket), target)
        for task in ms.relax_integration.extract_tasks(lowered, target):
            func = task.dispatched[0]["main"]
            if func.attrs is not None and ("tirx.is_scheduled" in func.attrs):
                continue
            if has_symbolic_shape(func):
                continue
            key = tvm_ffi.StructuralKey(task.dispatched[0])
            if key in seen:
                continue
            seen.add(key)
            out.append(TuningWorkload(task.task_name, bucket, int(task.weight), task.dispatched[0], _flop(func)))
    return out


def _flop(func) -> float:
    try:
        from tvm.s_tir.analysis import estimate_tir_flops
    except ImportError:  # pragma: no cover - older layouts
        return 0.0
    try:
        return float(estimate_tir_flops(tvm.IRModule({"main": func})))
    except Exception:  # noqa: BLE001 - an estimate only
        return 0.0
