"""Errors of the `deploy` package (gate, targets, on-device operations, model repository)."""
from __future__ import annotations

from pfp.errors import PfpError


class DeployError(PfpError):
    """Raised by the `deploy` package: a bad targets file, a failed device step, a busy repository."""
