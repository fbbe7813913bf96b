"""A TVM RPC server that serves from this process (no Popen helper), registered with a tracker.

It imports nothing but ``tvm`` (the runtime-only library is enough), so the same file runs on a phone
(Termux), a board, or under QEMU user-mode emulation where a helper process could not be started::

    python rpc_serve.py --tracker HOST:PORT --key KEY [--host 0.0.0.0] [--port 9090]

``xpuc rpc-server`` calls :func:`serve`. Each session is served in a forked child, as TVM's own server does.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys


def serve(tracker: tuple[str, int] | None, key: str, host: str = "0.0.0.0", port: int = 9090,
          port_end: int = 9199, custom_addr: str | None = None, silent: bool = False) -> None:
    """Bind, register with ``tracker`` under ``key`` and serve until SIGTERM / Ctrl-C."""

    from tvm.rpc import server as tvm_server

    logging.basicConfig(level=logging.ERROR if silent else logging.INFO, format="%(asctime)s %(message)s")
    port_bound = tvm_server._popen_start_rpc_server(host, port, port_end, tracker_addr=tracker, key=key,
                                                    custom_addr=custom_addr, silent=silent)
    print(f"rpc-server: serving on {host}:{port_bound} key '{key}'"
          + (f" via tracker {tracker[0]}:{tracker[1]}" if tracker else ""), flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    state = tvm_server.PopenRPCServerState.current
    while state.thread.is_alive():
        state.thread.join(0.5)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tracker", default=None, help="HOST:PORT of the RPC tracker")
    ap.add_argument("--key", default="xpuc", help="device key the tracker files this server under")
    ap.add_argument("--host", default="0.0.0.0")
    ap.add_argument("--port", type=int, default=9090)
    ap.add_argument("--port-end", type=int, default=9199)
    ap.add_argument("--custom-addr", default=None, help="address to report to the tracker")
    ap.add_argument("--silent", action="store_true")
    a = ap.parse_args(argv)
    tracker = None
    if a.tracker:
        h, _, p = a.tracker.rpartition(":")
        tracker = (h, int(p))
    try:
        serve(tracker, a.key, a.host, a.port, a.port_end, a.custom_addr, a.silent)
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
