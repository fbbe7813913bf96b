"""Argument types for the CLI: every numeric option is checked where it is parsed (argparse's one-line error)."""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable


class XpucArgumentParser(argparse.ArgumentParser):
    """argparse with the CLI's one error format: the usage, then one ``xpuc: error:`` line naming the command."""

    def error(self, message: str):
        self.print_usage(sys.stderr)
        command = self.prog.removeprefix("xpuc").strip()
        self.exit(2, f"xpuc: error: {command + ': ' if command else ''}{message}\n")


def int_at_least(low: int) -> Callable[[str], int]:
    """An integer ``>= low`` (thread counts, token counts, cluster sizes ...)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{text}' is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    parse.__name__ = "integer"
    return parse


def int_in(low: int, high: int) -> Callable[[str], int]:
    """An integer in ``[low, high]`` (ports)."""
    at_least = int_at_least(low)

    def parse(text: str) -> int:
        value = at_least(text)
        if value > high:
            raise argparse.ArgumentTypeError(f"must be at most {high}, got {value}")
        return value

    parse.__name__ = "integer"
    return parse


def float_in(low: float, high: float, low_open: bool = False, high_open: bool = False) -> Callable[[str], float]:
    """A finite number in the interval between ``low`` and ``high`` (open at either end when asked)."""
    lo, hi = ("(" if low_open else "["), (")" if high_open else "]")
    shown = f"{lo}{low:g}, {'inf' if math.isinf(high) else f'{high:g}'}{hi}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None
        if (not math.isfinite(value) or value < low or value > high or (low_open and value == low)
                or (high_open and value == high)):
            raise argparse.ArgumentTypeError(f"must be in {shown}, got {text}")
        return value

    parse.__name__ = "number"
    return parse


POSITIVE = int_at_least(1)
NON_NEGATIVE = int_at_least(0)
SHARE = float_in(0.0, 1.0, high_open=True)  # a sparsity: 0 <= s < 1
SECONDS = float_in(0.0, math.inf, low_open=True, high_open=True)
