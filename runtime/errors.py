"""The one exception type for expected failures: the CLI prints its message and exits with code 2."""

from __future__ import annotations


class XpucError(Exception):
    """Bad input or an unmet requirement, described in one line for the user."""

    exit_code = 2
