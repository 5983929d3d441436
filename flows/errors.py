"""Errors of the `flows` package (Prefect flows, MLflow tracking, CLI)."""
from __future__ import annotations

from pfp.errors import PfpError


class FlowError(PfpError):
    """Raised by the `flows` package: tracking, registry, rollouts, dispatch."""
