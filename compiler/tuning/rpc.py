"""Device farms over TVM RPC: a tracker, device servers (native or emulated aarch64), the tuning runner.

* :func:`start_tracker` / :func:`start_server` launch ``xpuc rpc-tracker`` / ``xpuc rpc-server`` as child
  processes in their own process group (TVM's tracker and server leave helper processes behind when
  only their parent is killed; :meth:`ManagedProcess.stop` ends the whole group).
* :func:`start_emulated_server` runs :mod:`xpuc.runtime.rpc_serve` with the arm64 Python of
  :mod:`xpuc.targets.qemu` under QEMU user mode: an aarch64 device on the local machine.
* :func:`check_tracker` answers within a timeout whether the tracker is up and has a device for a key.
* :func:`make_rpc_runner` is meta_schedule's ``RPCRunner`` with a timeout and an argument allocator that
  works on TVM runtime-only builds (no ``tvm.contrib.random``), as on phones.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from xpuc.runtime.errors import XpucError
from xpuc.targets.qemu import DEFAULT_CPU, emulated_env, emulated_python

#: the device-side server (imports nothing but tvm), run as a script on the host or under QEMU
_SERVER_SCRIPT = str(Path(__file__).resolve().parents[2] / "runtime" / "rpc_serve.py")


def parse_address(text: str, what: str = "--rpc-tracker") -> tuple[str, int]:
    host, _, port = str(text).rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise XpucError(f"{what} must be HOST:PORT, got '{text}'")
    return host, int(port)


@dataclass
class ManagedProcess:
    """A child process (and its process group) started by xpuc."""

    proc: subprocess.Popen
    address: tuple[str, int]
    what: str

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait(timeout)
        else:  # the leader is gone; helpers may remain in its group
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def __enter__(self) -> ManagedProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _wait_port_line(proc: subprocess.Popen, prefix: str, timeout: float, what: str) -> tuple[str, int]:
    """Read the child's stdout until ``prefix host:port`` appears."""
    box: dict = {}

    def reader() -> None:
        for line in proc.stdout:
            if line.startswith(prefix):
                box["addr"] = line[len(prefix):].split()[0]
                return

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    t.join(timeout)
    if "addr" not in box:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        raise XpucError(f"{what} did not start within {timeout:.0f} s")
    return parse_address(box["addr"], what)


def start_tracker(host: str = "127.0.0.1", port: int = 9190, port_end: int = 9299,
                  timeout: float = 30) -> ManagedProcess:
    cmd = [sys.executable, "-m", "xpuc.compiler.cli", "rpc-tracker", "--host", host, "--port", str(port),
           "--port-end", str(max(port_end, port + 100))]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            start_new_session=True)
    return ManagedProcess(proc, _wait_port_line(proc, "rpc-tracker: listening on ", timeout, "rpc tracker"),
                          "tracker")


def _server_args(tracker: tuple[str, int], key: str, host: str, port: int) -> list[str]:
    return ["--tracker", f"{tracker[0]}:{tracker[1]}", "--key", key, "--host", host, "--port", str(port),
            "--port-end", str(port + 200)]


def start_server(tracker: tuple[str, int], key: str, host: str = "127.0.0.1", port: int = 9400,
                 timeout: float = 30) -> ManagedProcess:
    cmd = [sys.executable, _SERVER_SCRIPT, *_server_args(tracker, key, host, port)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            start_new_session=True)
    return ManagedProcess(proc, _wait_port_line(proc, "rpc-server: serving on ", timeout, "rpc server"), "server")


def start_emulated_server(tracker: tuple[str, int], key: str, host: str = "127.0.0.1", port: int = 9600,
                          timeout: float = 120, cpu: str | None = None) -> ManagedProcess:
    """An aarch64 RPC server: arm64 Python + TVM runtime under ``qemu-aarch64-static``."""

    env = emulated_env(cpu or DEFAULT_CPU)
    cmd = [*emulated_python(), _SERVER_SCRIPT,
           *_server_args(tracker, key, host, port), "--silent"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env,
                            start_new_session=True)
    return ManagedProcess(proc, _wait_port_line(proc, "rpc-server: serving on ", timeout, "emulated rpc server"),
                          "server")


def _call_with_timeout(fn, timeout: float, what: str):
    box: dict = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except Exception as e:  # noqa: BLE001 - reported below
            box["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        raise XpucError(f"{what} did not answer within {timeout:.0f} s")
    if "error" in box:
        raise XpucError(f"{what}: {str(box['error']).strip().splitlines()[-1][:160]}")
    return box["value"]


def tracker_summary(host: str, port: int, timeout: float = 10.0) -> dict:
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
        raise XpucError(f"RPC tracker {host}:{port} does not answer ({e.strerror or e}); start one with "
                        "`xpuc rpc-tracker` or check the address") from None
    import tvm.rpc

    return _call_with_timeout(lambda: tvm.rpc.connect_tracker(host, port).summary(), timeout,
                              f"RPC tracker {host}:{port}")


def check_tracker(host: str, port: int, key: str, timeout: float = 10.0, wait_free: float = 60.0) -> dict:
    """The tracker's summary once ``key`` has a free device; clear errors otherwise."""
    deadline = time.monotonic() + wait_free
    while True:
        summary = tracker_summary(host, port, timeout)
        queue = summary.get("queue_info", {})
        if key not in queue:
            known = ", ".join(sorted(queue)) or "none"
            raise XpucError(f"no device is registered under key '{key}' at {host}:{port} (keys: {known}); "
                            f"start one with `xpuc rpc-server --tracker {host}:{port} --key {key}`")
        if queue[key].get("free", 0) > 0:
            return summary
        if time.monotonic() > deadline:
            raise XpucError(f"every device under key '{key}' at {host}:{port} stayed busy for {wait_free:.0f} s; "
                            "retry later or add devices")
        time.sleep(1.0)


def alloc_arguments(session, device, args_info, alloc_repeat: int):
    """RPCRunner argument allocator: random inputs from numpy, copied to the device (runtime-only servers)."""
    from tvm.s_tir.meta_schedule.runner.utils import alloc_argument_common

    rng = np.random.default_rng(0)

    def fill(arr) -> None:
        data = rng.uniform(-1.0, 1.0, tuple(arr.shape))
        arr.copyfrom(data.astype(str(arr.dtype)))

    try:
        fill_remote = session.get_function("tvm.contrib.random.random_fill_for_measure")
    except Exception:  # noqa: BLE001 - runtime-only builds lack tvm.contrib.random
        fill_remote = None
    return alloc_argument_common(fill_remote or fill, device, args_info, alloc_repeat)


def make_rpc_runner(host: str, port: int, key: str, timeout_s: float = 120.0, workers: int = 1):
    from tvm.s_tir import meta_schedule as ms

    cfg = ms.runner.RPCConfig(tracker_host=host, tracker_port=port, tracker_key=key, session_priority=1,
                              session_timeout_sec=int(timeout_s))
    ev = ms.runner.EvaluatorConfig(number=3, repeat=1, min_repeat_ms=0, enable_cpu_cache_flush=False)
    return ms.runner.RPCRunner(rpc_config=cfg, evaluator_config=ev, max_workers=workers,
                               f_alloc_argument=alloc_arguments)


def run_tracker(host: str, port: int, port_end: int) -> None:
    """Serve a tracker in this process until SIGTERM / Ctrl-C (``xpuc rpc-tracker``)."""
    from tvm.rpc import tracker as tvm_tracker

    tr = tvm_tracker.Tracker(host, port=port, port_end=port_end, silent=True)
    print(f"rpc-tracker: listening on {host}:{tr.port}", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        try:
            tr.terminate()
        except OSError:  # its helper process already got the same signal
            pass
