"""Errors of the `export` package (ONNX export, backends, latency)."""
from __future__ import annotations

from pfp.errors import PfpError


class ExportPackageError(PfpError):
    """Raised by the `export` package: a failed export, a backend that cannot run, a bad bundle."""
