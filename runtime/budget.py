"""Memory budgets as users write them: ``4GiB``, ``512MiB``, ``1.5GB`` (bytes) or ``50%`` (share of the FFN)."""

from __future__ import annotations

from xpuc.runtime.errors import XpucError


def parse_size(text: str) -> int:
    """``4GiB``, ``512MiB``, ``1.5GB``, ``123456`` -> bytes."""
    t = str(text).strip()
    units = {"kib": 2**10, "mib": 2**20, "gib": 2**30, "kb": 10**3, "mb": 10**6, "gb": 10**9, "b": 1}
    for u, m in sorted(units.items(), key=lambda kv: -len(kv[0])):
        if t.lower().endswith(u):
            try:
                return int(float(t[: -len(u)]) * m)
            except ValueError:
                break
    try:
        return int(t)
    except ValueError:
        raise XpucError(f"cannot read the size '{text}' (examples: 4GiB, 512MiB)") from None


def parse_budget(text: str) -> tuple[float | None, int | None]:
    """``50%`` -> share of the FFN kept in memory; ``2GiB`` -> total memory budget in bytes."""
    t = text.strip()
    if t.endswith("%"):
        try:
            v = float(t[:-1]) / 100
        except ValueError:
            raise XpucError(f"cannot read the budget '{text}' (examples: 50%, 2GiB)") from None
        if not 0 < v <= 1:
            raise XpucError("--budget in percent must be in (0, 100]")
        return v, None
    return None, parse_size(t)
