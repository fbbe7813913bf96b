"""Runs inside the emulated aarch64 Python: a packed model (its linux-arm64 twin), greedy generation.

Usage: python arm_offload_runner.py PACKED_DIR MODE FFN_SHARE IDS.npy TOKENS OUT.npz
Loads the packed model with TVM's runtime library only (verified as ``xpuc run`` does), keeps ``FFN_SHARE`` of
its FFN in memory and reads the rest from ``ffn.bin``; writes the greedy tokens, the logits after the prompt and
what was read from flash.
"""

import platform
import sys

import numpy as np


def main() -> int:
    assert platform.machine() == "aarch64", platform.machine()
    from xpuc.runtime.generation import generate
    from xpuc.runtime.offload import OffloadModel

    art, mode, share, ids_path, tokens, out_path = sys.argv[1:7]
    with OffloadModel(art, mode, float(share), context=256) as m:
        res = generate(m, np.load(ids_path).tolist(), int(tokens), vocab_size=m.config.vocab_size)
        read = sum(t.bytes_read for t in m.token_metrics)
        native = m.reader._native is not None
    np.savez(out_path, tokens=np.array(res.tokens), first_logits=res.first_logits, bytes_read=np.array(read),
             native_reader=np.array(bool(native)), machine=np.array(platform.machine()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
