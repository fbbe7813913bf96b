"""A memory balloon: hold N bytes of this machine's memory so that a process run beside it has only the rest.

    python benchmarks/memory_balloon.py --leave 7GiB     # holds (available - 7 GiB); prints "ready" when it does

The pages are anonymous, written once and locked with ``mlock`` where allowed (otherwise written only: with no
swap they cannot leave memory either), so the page cache — where llama.cpp's ``mmap`` of a model lives — is
squeezed into what is left. The balloon holds until it is sent SIGTERM or SIGINT, or its stdin closes, and frees
everything on exit. Used by ``benchmarks/peer_offload.py`` to give llama.cpp the memory xpuc is allowed.
"""

from __future__ import annotations

import argparse
import ctypes
import mmap
import signal
import sys
import threading

import psutil

from xpuc.runtime.budget import parse_size

CHUNK = 256 << 20


def inflate(leave: int) -> tuple[list[mmap.mmap], bool]:
    """Allocate and touch chunks until ``leave`` bytes of memory are available; (the chunks, whether locked)."""
    libc = ctypes.CDLL(None, use_errno=True)
    chunks, locked = [], True
    while psutil.virtual_memory().available - CHUNK > leave:
        m = mmap.mmap(-1, CHUNK, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        for off in range(0, CHUNK, mmap.PAGESIZE):
            m[off] = 1
        addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
        if locked and libc.mlock(ctypes.c_void_p(addr), ctypes.c_size_t(CHUNK)) != 0:
            locked = False
        chunks.append(m)
    return chunks, locked


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--leave", required=True, help="memory to leave available, e.g. 7GiB")
    args = ap.parse_args()
    leave = parse_size(args.leave)
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    threading.Thread(target=lambda: (sys.stdin.read(), done.set()), daemon=True).start()
    chunks, locked = inflate(leave)
    avail = psutil.virtual_memory().available
    print(f"ready: holding {len(chunks) * CHUNK / 2**30:.1f} GiB ({'locked' if locked else 'not locked'}), "
          f"{avail / 2**30:.1f} GiB available", flush=True)
    done.wait()


if __name__ == "__main__":
    main()
