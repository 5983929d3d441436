"""The rollout as a picture: where each device's time went, stage by stage."""
from __future__ import annotations

from pathlib import Path

from pfp.plots import new_axes, save_figure

STEPS = ("slot_wait", "transfer", "build", "verify", "benchmark", "install")
COLORS = {"orchestration": "#bbbbbb", "slot_wait": "#8c564b", "transfer": "#1f77b4", "build": "#ff7f0e",
          "verify": "#2ca02c", "benchmark": "#9467bd", "install": "#17becf"}


def plot_rollout(report: dict, path: str | Path) -> Path:
    """One horizontal bar per device: the seconds from dispatch to the end as the rollout saw
    them, split into the device's own steps and the rest (orchestration: queue pickup, the
    job's process start, Prefect and MLflow calls). Failed and skipped devices are labelled."""
    fig, ax = new_axes()
    outcomes = report["outcomes"]
    labels = []
    for i, o in enumerate(outcomes):
        sec = (o.get("result") or {}).get("seconds", {})
        left = 0.0
        work = sum(sec.get(k, 0.0) for k in STEPS)
        parts = [("orchestration", max(0.0, o["seconds"] - work)), *((k, sec.get(k, 0.0)) for k in STEPS)]
        for name, width in parts:
            ax.barh(i, width, left=left, color=COLORS[name], label=name if i == 0 else None)
            left += width
        labels.append(f"{o['device']} ({o['stage']})" + ("" if o["status"] in ("active", "benchmarked")
                                                         else f": {o['status']}"))
    ax.set_yticks(range(len(outcomes)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("seconds from dispatch to done")
    ax.set_title(f"rollout {report['rollout_id']}: {report['model']} v{report['version']}", fontsize=9)
    return save_figure(fig, ax, Path(path))


__all__ = ["plot_rollout"]
