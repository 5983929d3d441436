"""`pfp serve`: the compress flow served locally with each config's cron schedule.

Prefect's own `serve` runs the deployments in this process and triggers them on schedule;
for work pools and workers instead, deploy with `prefect deploy` and prefect.yaml.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from flows.config import PipelineConfig


def deployments_for(cfgs: Sequence[PipelineConfig], *, cron: str | None = None,
                    sources: Sequence[Path | None] | None = None) -> list:
    """One compress-flow deployment per config, scheduled by schedule.cron (or `cron`)."""
    from prefect.schedules import Cron

    from flows.compress import compress_flow

    out = []
    for cfg, source in zip(cfgs, sources or [None] * len(cfgs)):
        when = cfg.schedule.cron or cron
        params = {"config_path": str(Path(source).resolve())} if source else {"config": cfg.model_dump(mode="json")}
        out.append(compress_flow.to_deployment(
            name=cfg.name, parameters=params, schedules=[Cron(when, timezone=cfg.schedule.timezone)] if when else [],
            tags=["pfp", cfg.name], description=f"compress {cfg.model.name} on {cfg.data.name}",
        ))
    return out


def serve_configs(cfgs: Sequence[PipelineConfig], *, cron: str | None = None,
                  sources: Sequence[Path | None] | None = None) -> None:
    """Serve the deployments until interrupted."""
    from prefect import serve

    serve(*deployments_for(cfgs, cron=cron, sources=sources))
