"""Resolve "package.module:attribute" import paths, the way users name their own models,
data and tasks in a config, with one clear line when the path does not resolve."""
from __future__ import annotations

import importlib
import os
import re
import sys
from typing import Any, Callable

from .errors import CoreError

_PATH = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


class ImportPathError(CoreError, ValueError):
    """An import path that does not resolve, or a callable behind it that raised."""


def is_import_path(name: str) -> bool:
    """True for "package.module:attribute" (the colon tells it from a zoo name like "tv:resnet18")."""
    return bool(_PATH.match(name.strip())) and not name.strip().lower().startswith(("tv:", "timm:"))


def resolve(path: str, what: str) -> Any:
    """The object at "package.module:attribute" (dots after the colon walk attributes).

    `what` names the config field in the error, e.g. "model.name".
    """
    path = path.strip()
    if not _PATH.match(path):
        raise ImportPathError(f"{what}: {path!r} is not an import path of the form 'package.module:attribute'")
    module_name, attr = path.split(":", 1)
    # As `python -m` does: a config's import paths may name modules of the directory it runs in
    # (a console script's sys.path starts at its own bin/ folder instead).
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.append(os.getcwd())
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as e:
        raise ImportPathError(f"{what}: cannot import module {module_name!r} ({e})") from e
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ImportPathError(f"{what}: module {module_name!r} has no attribute {attr!r}") from None
    return obj


def call(path: str, what: str, **kwargs: Any) -> Any:
    """Resolve `path` and call it with `kwargs`; its own error is included in one line."""
    fn: Callable[..., Any] = resolve(path, what)
    if not callable(fn):
        raise ImportPathError(f"{what}: {path!r} is not callable (it is a {type(fn).__name__})")
    try:
        return fn(**kwargs)
    except Exception as e:  # a user's callable: any error it raises is reported, not re-typed
        first = (str(e).strip().splitlines() or [""])[0]
        raise ImportPathError(f"{what}: {path}({', '.join(kwargs)}) raised {type(e).__name__}: {first}") from e
