"""Runs inside the emulated aarch64 Python: a compiled decoder module, prefill then greedy decode.

Usage: python arm_model_runner.py MODEL.so PARAMS.npz IDS.npy STEPS OUT.npz
PARAMS.npz holds the weights as p0000, p0001, ... in the module's packing order.
Writes the logits after prefill and after each decode step, and the greedy tokens.
"""

import platform
import sys

import numpy as np
import tvm
from tvm.runtime import ShapeTuple
from tvm.runtime.vm import VirtualMachine


def main() -> int:
    assert platform.machine() == "aarch64", platform.machine()
    lib_path, params_path, ids_path, steps, out_path = sys.argv[1:6]
    dev = tvm.cpu()
    vm = VirtualMachine(tvm.runtime.load_module(lib_path), dev)
    data = np.load(params_path)
    params = [tvm.runtime.tensor(data[k], dev) for k in sorted(data.files)]
    kv = vm["create_paged_kv_cache"](ShapeTuple([1]), ShapeTuple([256]), ShapeTuple([64]), ShapeTuple([16]),
                                     ShapeTuple([0]))
    tvm.get_global_func("vm.builtin.kv_state_add_sequence")(kv, 0)
    begin = tvm.get_global_func("vm.builtin.kv_state_begin_forward")
    end = tvm.get_global_func("vm.builtin.kv_state_end_forward")

    def step(fn, ids):
        nonlocal kv
        begin(kv, ShapeTuple([0]), ShapeTuple([ids.shape[1]]))
        logits, kv = vm[fn](tvm.runtime.tensor(ids, dev), kv, params)
        end(kv)
        return logits.numpy()[0, -1]

    ids = np.load(ids_path).astype(np.int32).reshape(1, -1)
    logits = [step("prefill", ids)]
    tokens = []
    for _ in range(int(steps)):
        tokens.append(int(np.argmax(logits[-1])))
        logits.append(step("decode", np.array([[tokens[-1]]], np.int32)))
    np.savez(out_path, logits=np.stack(logits), tokens=np.array(tokens), machine=np.array(platform.machine()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
