"""The disk's random-read curve as xpuc measures it (``xpuc targets --measure-flash``) next to ``fio`` on the same
file, same block sizes and queue depths, interleaved point by point.

    python benchmarks/flash_curve.py [FILE] [--seconds 1]

fio (Debian package ``fio``) runs ``--rw=randread --direct=1 --ioengine=libaio --iodepth=QD --bs=B`` over the
whole file with one job; xpuc runs its runtime's reader (native AIO on one submission queue where available).
FILE defaults to a 2 GiB file of random bytes under ``.cache/xpuc/flash-curve`` (written once). Writes
``benchmarks/results/flash_curve.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BLOCKS = (4, 16, 64, 256, 1024)
DEPTHS = (1, 8, 32, 64)


def test_file(path: Path, gib: int = 2) -> Path:
    if path.is_file() and path.stat().st_size == gib << 30:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".part")
    with open(tmp, "wb") as f:
        for _ in range(gib * 64):
            f.write(os.urandom(16 << 20))
    os.replace(tmp, path)
    return path


def fio_mbps(path: Path, kib: int, depth: int, seconds: float) -> float:
    r = subprocess.run(["fio", "--name=randread", f"--filename={path}", "--rw=randread", "--direct=1",
                        "--ioengine=libaio", f"--iodepth={depth}", f"--bs={kib}k", "--numjobs=1", "--time_based",
                        f"--runtime={seconds}", "--ramp_time=0", "--norandommap", "--randrepeat=0",
                        "--output-format=json"], capture_output=True, text=True, check=True)
    return json.loads(r.stdout)["jobs"][0]["read"]["bw_bytes"] / 1e6


def main() -> None:
    from xpuc.targets.flash_curve import measure_read_curve

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("file", nargs="?", default=None)
    ap.add_argument("--seconds", type=float, default=1.0)
    ap.add_argument("-o", "--output", default=str(ROOT / "benchmarks" / "results" / "flash_curve.json"))
    args = ap.parse_args()
    if shutil.which("fio") is None:
        sys.exit("flash_curve.py: needs fio (apt-get install fio)")
    path = Path(args.file) if args.file else test_file(ROOT / ".cache" / "xpuc" / "flash-curve" / "random.bin")
    rows = []
    print(f"{'block':>6s} {'QD':>3s} {'xpuc MB/s':>10s} {'fio MB/s':>9s} {'ratio':>6s}")
    for kib in BLOCKS:
        for depth in DEPTHS:
            fio = fio_mbps(path, kib, depth, args.seconds)
            curve = measure_read_curve(path, (kib,), (depth,), seconds=args.seconds)
            ours = curve.points[0]["random_mbps"]
            rows.append({"block_kib": kib, "queue_depth": depth, "xpuc_mbps": ours, "fio_mbps": round(fio, 1),
                         "ratio": round(ours / fio, 3), "engine": curve.engine})
            print(f"{kib:6d} {depth:3d} {ours:10.0f} {fio:9.0f} {ours / fio:6.2f}", flush=True)
    fio_version = subprocess.run(["fio", "--version"], capture_output=True, text=True).stdout.strip()
    Path(args.output).write_text(json.dumps({"file": str(path), "seconds_per_point": args.seconds,
                                             "fio": fio_version, "points": rows}, indent=1))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
