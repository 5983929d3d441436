"""The project's error hierarchy.

Every error raised for bad input or a failed expectation (a config field, a file, a layer, a
device) derives from `PfpError`, with one subclass per package. The CLI shows a `PfpError` as
one line; anything else is a bug and keeps its traceback.
"""
from __future__ import annotations


class PfpError(Exception):
    """Base of every expected error in the project; its message is one line for the user."""


class CoreError(PfpError):
    """Raised by the `pfp` package: configs, data, models, checkpoints, pruning."""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type name when it has none), for one-line reports."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0]
