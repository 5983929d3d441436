"""Extension points that packages above pfp fill in by registering an import path.

pfp never imports the export package (the layering test holds it), yet pruning to a latency
target needs a latency table measured on a backend and the pruned model timed there. The
export package provides that; flows registers it by name at import, and pfp resolves the
name when a round asks for it. Registering a name costs no import.
"""
from __future__ import annotations

from typing import Any

from .errors import CoreError
from .imports import resolve

_REGISTRY: dict[str, str] = {}

LATENCY_PRUNER = "latency_pruner"  # (setup, model, cfg, keep_ratio, *, seed, divergence) -> (model, report, target report)
LATENCY_PRUNE_MODEL = "latency_prune_model"  # export.latency_target.prune_to_latency's signature


def register(point: str, path: str) -> None:
    """Fill extension `point` with the callable at import path `path` ("package.module:name")."""
    _REGISTRY[point] = path


def lookup(point: str, why: str) -> Any:
    """The callable registered for `point`; one line saying what is missing when nothing is."""
    path = _REGISTRY.get(point)
    if path is None:
        raise CoreError(f"{why}: nothing provides {point!r} here (the export package registers it when "
                        "flows is imported: run through `pfp run` / `pfp local run`, or `import flows` first)")
    return resolve(path, point)
