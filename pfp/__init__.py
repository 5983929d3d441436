"""Provable Filter Pruning: score filters on a small batch of data, allocate per-layer
budgets, and physically remove the filters that matter least.

The Python API is two calls (see docs/api.md):

    import pfp
    small, report = pfp.prune(model, calib_loader, target="flops", keep=0.5, example_input=x)
    result = pfp.run("my_config.yaml")
"""
from __future__ import annotations

import types


class _CallableModule(types.ModuleType):
    """`pfp.prune` is both the module (`pfp.prune.prune`, the core function, keeps working)
    and the API call `pfp.prune(model, ...)`: importing a submodule rebinds the package
    attribute to the module, so the module itself must be callable."""

    def __call__(self, *args, **kwargs):
        from .api import prune as api_prune

        return api_prune(*args, **kwargs)


def run(config):
    """Run the local cascade from a YAML path, a mapping or a RunConfig (see `pfp.api.run`)."""
    from .api import run as api_run

    return api_run(config)


def __getattr__(name: str):
    if name == "prune":
        import importlib

        return importlib.import_module(__name__ + ".prune")  # makes itself callable on import
    raise AttributeError(f"module 'pfp' has no attribute {name!r}")
