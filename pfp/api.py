"""The Python API, for people who prune from code instead of YAML.

    import pfp
    small, report = pfp.prune(model, calib_loader, target="flops", keep=0.5, example_input=x)
    result = pfp.run("configs/quickstart.yaml")        # the local cascade, as `pfp local run`

`pfp.prune.prune` with a `pfp.config.PruneConfig` is the same function underneath.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .config import PruneConfig, RunConfig
from .tasks import Task


def prune(
    model: nn.Module,
    calib_loader: Any,
    *,
    example_input: torch.Tensor,
    keep: float = 0.5,
    target: str = "flops",
    method: str = "pfp",
    postprocess_loader: Any = None,
    device: str | torch.device = "cpu",
    seed: int = 0,
    task: Task | None = None,
    **options: Any,
) -> tuple[nn.Module, Any]:
    """Prune a copy of `model` to keep `keep` of its `target` ("flops", "params" or "latency").

    `calib_loader` yields (inputs, anything) batches: only the inputs are used to score
    filters, so any task works; `task` (a `pfp.tasks.Task`) only supplies the output divergence
    that the measuring allocations ("holdout", "search") minimise. `options` are further `PruneConfig` fields (for example
    `allocation`, `latency`, `calib_split`). Returns the pruned, post-processed model and its
    `PruneReport`; `model` itself is left unchanged.
    """
    from .prune import prune as _prune_impl  # the module of the same name, see pfp/__init__.py

    cfg = PruneConfig(method=method, target=target, **options)
    divergence = task.divergence if task is not None else None
    if cfg.target == "latency":  # measured on a backend: the export package does it (see pfp.extensions)
        from .extensions import LATENCY_PRUNE_MODEL, lookup

        fn = lookup(LATENCY_PRUNE_MODEL, "target='latency'")
        small, report, _ = fn(model, calib_loader, cfg, keep, example_input=example_input,
                              postprocess_loader=postprocess_loader, device=str(device), seed=seed,
                              divergence=divergence)
        return small, report
    small, report, _soft = _prune_impl(model, calib_loader, cfg, keep, example_input=example_input,
                                       postprocess_loader=postprocess_loader, device=device, seed=seed,
                                       divergence=divergence)
    return small, report


def run(config: str | Path | dict | RunConfig) -> Any:
    """Run the local cascade (train or reuse the base, prune round by round, retrain, choose).

    `config` is a YAML path, a mapping or a `RunConfig`; returns the cascade's result.
    """
    from .cascade import run_cascade
    from .config import config_from_dict, load_config

    if isinstance(config, RunConfig):
        cfg = config
    elif isinstance(config, dict):
        cfg = config_from_dict(config)
    else:
        cfg = load_config(config)
    return run_cascade(cfg)
