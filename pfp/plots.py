"""The plots people would rather see than read: accuracy vs FLOPs, the per-layer budget."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from pfp.results import RoundResult


def new_axes():
    """A figure and axes on the file-only Agg backend (no display on servers)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(6.4, 4.2))


def save_figure(fig, ax, path: Path) -> Path:
    """Grid, legend, tight layout; write the PNG and free the figure."""
    import matplotlib.pyplot as plt

    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_accuracy_vs_flops(
    name: str, base_acc: float, rows: Sequence[RoundResult], tolerance: float, chosen: int | None, path: Path
) -> Path:
    """Test accuracy after (and before) retraining against the share of FLOPs kept."""
    ok = [r for r in rows if r.ok]
    xs = [100.0] + [100.0 - r.flops_removed_pct for r in ok]
    fig, ax = new_axes()
    ax.plot(xs, [base_acc] + [r.acc for r in ok], "o-", label="after retraining")
    if ok:
        ax.plot(xs[1:], [r.acc_before_retrain for r in ok], "x--", color="gray", alpha=0.7, label="before retraining")
    ax.axhline(base_acc, color="black", ls=":", lw=1, label=f"unpruned {base_acc:.2f}%")
    ax.axhline(base_acc - tolerance, color="red", ls=":", lw=1, label=f"tolerance -{tolerance:g}")
    if chosen is not None:
        r = rows[chosen]
        ax.plot([100.0 - r.flops_removed_pct], [r.acc], "*", ms=16, color="gold", mec="black", label="chosen")
    ax.set_xlabel("FLOPs kept (% of unpruned)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{name}: {ok[0].method if ok else ''} cascade")
    ax.invert_xaxis()
    return save_figure(fig, ax, path)


def plot_layer_budget(report: dict, path: Path, title: str = "") -> Path:
    """Kept vs total channels per pruned layer, from a PruneReport's dict."""
    layers = report.get("layers") or []
    names = [layer["name"] for layer in layers]
    fig, ax = new_axes()
    fig.set_size_inches(max(6.4, 0.28 * len(names) + 2), 4.2)
    xs = range(len(names))
    ax.bar(xs, [layer["size"] for layer in layers], color="lightgray", label="channels before")
    ax.bar(xs, [layer["kept"] for layer in layers], color="tab:blue", label="kept")
    ax.set_xticks(list(xs))
    ax.set_xticklabels(names, rotation=75, ha="right", fontsize=7)
    ax.set_ylabel("channels")
    ax.set_title(title or f"per-layer budget ({report.get('method', '')})")
    return save_figure(fig, ax, path)
