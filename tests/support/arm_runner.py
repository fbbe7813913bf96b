"""Runs inside the emulated aarch64 Python (only numpy and TVM's runtime are available there).

Usage: python arm_runner.py CASES.json INPUTS.npz OUTPUTS.npz

CASES.json: {"lib": path of the .so, "cases": [{"name": case, "func": exported function,
"args": [npz keys in call order], "outputs": [npz keys of the arguments written by the call]}]}
Arrays are shared between cases in order, so one case can consume another's output.
"""

import json
import platform
import sys

import numpy as np
import tvm


def main() -> int:
    assert platform.machine() == "aarch64", platform.machine()
    spec = json.load(open(sys.argv[1]))
    data = dict(np.load(sys.argv[2]))
    lib = tvm.runtime.load_module(spec["lib"])
    dev = tvm.cpu()
    results = {}
    tensors = {}  # shared across cases: a later case sees what an earlier one wrote
    for case in spec["cases"]:
        for k in case["args"]:
            if k not in tensors:
                tensors[k] = tvm.runtime.tensor(data[k], dev)
        lib[case["func"]](*[tensors[k] for k in case["args"]])
        for k in case["outputs"]:
            results[k] = tensors[k].numpy()
    np.savez(sys.argv[3], machine=np.array(platform.machine()), **results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
