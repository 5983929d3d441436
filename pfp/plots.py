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


def save_figure(fig, ax, path: Path, **legend) -> Path:
    """Grid, legend (`legend`: its keyword arguments), tight layout; write the PNG and free the figure."""
    import matplotlib.pyplot as plt

    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, **legend)
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


def plot_layer_budget(report: dict, path: Path, original: dict[str, int] | None = None, title: str = "") -> Path:
    """Per pruned layer, in network order: the original width, the width before this round
    and the width kept, as fractions of the original (convs and linears share one scale that
    way), with the kept count written on each bar.

    `report` is a PruneReport's dict; `original` maps layer names to their unpruned widths
    (None: this round pruned the unpruned model).
    """
    layers = report.get("layers") or []
    names = [layer["name"] for layer in layers]
    orig = [float((original or {}).get(layer["name"], layer["size"])) for layer in layers]
    before = [layer["size"] / o for layer, o in zip(layers, orig)]
    kept = [layer["kept"] / o for layer, o in zip(layers, orig)]
    fig, ax = new_axes()
    fig.set_size_inches(max(6.4, 0.32 * len(names) + 2), 4.4)
    xs = list(range(len(names)))
    ax.bar(xs, [1.0] * len(xs), color="whitesmoke", edgecolor="lightgray", label="original width")
    if original:
        ax.bar(xs, before, color="lightgray", label="before this round")
    ax.bar(xs, kept, color="tab:blue", label="kept")
    for x, layer, k in zip(xs, layers, kept):
        ax.text(x, k + 0.01, str(layer["kept"]), ha="center", va="bottom", fontsize=6)
    ax.set_xticks(xs)
    ax.set_xticklabels(names, rotation=75, ha="right", fontsize=7)
    ax.set_ylim(0, 1.3)
    ax.set_ylabel("channels kept (fraction of original)")
    ax.set_title(title or f"per-layer budget ({report.get('method', '')})")
    return save_figure(fig, ax, path, loc="upper center", ncol=3)
