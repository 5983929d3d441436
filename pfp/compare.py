"""`pfp compare`: several pruning methods side by side (spec section 7).

Same trained base model, same data, same calibration set, same retraining budget, same
FLOP target: each method prunes the base one-shot to (1 - reduction) of its FLOPs, is
evaluated before and after retraining with cfg.retrain, and lands in one table. Each method
runs plain (as published: no BN recalibration, no reconstruction) and with the shared
post-processing (both on, for every method alike), so a win is attributed to its cause:
the method's scores and budgets, or the post-processing any method can have.

Writes output_dir/<name>/compare/compare.json, compare.csv and compare.png, plus one
folder per point (<method>[+pp]_r<reduction>/ with model.pt, report.json, done.json) so an
interrupted comparison continues where it stopped. A method that cannot reach a point
(PruneError) or fails there is recorded with its error, and the comparison goes on.
"""
from __future__ import annotations

import csv
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table
from rich.text import Text

from pfp.config import CompareConfig, ConfigError, RunConfig
from pfp.pipeline import (
    Setup,
    _error_row,
    _fmt_int,
    _refuse_distributed,
    _say,
    _step_key,
    _write_json,
    prepare,
    prune_and_retrain,
)
from pfp.plots import new_axes, save_figure

__all__ = ["run_compare", "compare_point", "save_compare", "CSV_FIELDS"]

VARIANTS = {"plain": [False], "shared": [True], "both": [False, True]}
CSV_FIELDS = [
    "method", "postprocess", "target", "reduction", "keep_ratio", "achieved_keep", "target_flops_removed_pct", "flops_removed_pct",
    "params_removed_pct", "params", "flops", "acc_before_retrain", "acc", "acc_change", "eps",
    "prune_seconds", "retrain_seconds", "seconds", "error",
]  # fmt: skip


def _point_dir(out: Path, method: str, reduction: float, shared: bool) -> Path:
    return out / f"{method}{'+pp' if shared else ''}_r{reduction:g}"


def _label(r: dict) -> str:
    return r["method"] + (" + BN/refit" if r.get("postprocess") == "shared" else "")


def _table(rows: list[dict], setup: Setup, name: str) -> Table:
    t = Table(title=f"compare {name}: one-shot FLOP reduction, then {setup.cfg.retrain.epochs} epochs of retraining")  # type: ignore[union-attr]
    for col in ("method", "FLOPs removed (target)", "params removed", "acc before retrain", "acc after", "change", "time"):
        t.add_column(col, justify="left" if col == "method" else "right")
    t.add_row("unpruned", "0%", "0%", "", f"{setup.acc:.2f}%", "", "", style="dim")
    for r in rows:
        if r.get("error"):
            t.add_row(_label(r), f"({r['target_removed_pct']:.0f}%)", "", "", Text("failed", style="red"), "", "")
            continue
        t.add_row(
            _label(r),
            f"{r['flops_removed_pct']:.1f}%" + (f" ({r['target_removed_pct']:.0f}%)" if r["target"] == "flops" else ""),
            f"{r['params_removed_pct']:.1f}%" + (f" ({r['target_removed_pct']:.0f}%)" if r["target"] == "params" else ""),
            f"{r['acc_before_retrain']:.2f}%",
            f"{r['acc']:.2f}%",
            Text(f"{r['acc_change']:+.2f}", style="green" if r["acc_change"] >= -setup.cfg.prune.tolerance else "red"),
            f"{r['seconds']:.0f}s",
        )
    return t


def _plot(rows: list[dict], base_acc: float, name: str, path: Path) -> Path:
    fig, ax = new_axes()
    markers = "osD^v<>PX*"
    methods = list(dict.fromkeys(_label(r) for r in rows))
    for i, m in enumerate(methods):
        pts = sorted((r["flops_removed_pct"], r["acc"]) for r in rows if _label(r) == m and not r.get("error"))
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=markers[i % len(markers)], label=m,
                    ls="--" if "BN/refit" in m else "-")
    ax.axhline(base_acc, color="black", ls="--", lw=1, label=f"unpruned {base_acc:.2f}%")
    ax.set_xlabel("FLOPs removed (%)")
    ax.set_ylabel("test accuracy after retraining (%)")
    ax.set_title(f"{name}: methods compared")
    return save_figure(fig, ax, path)


def run_compare(
    cfg: RunConfig,
    methods: list[str] | None = None,
    reductions: list[float] | None = None,
    *,
    console: Console | None = None,
    progress: bool = True,
) -> list[dict]:
    """Prune the same base model with each method to each FLOP reduction, retrain, tabulate.

    methods / reductions default to cfg.compare's. Returns one row per (method, reduction),
    failed points included with their `error`.
    """
    _refuse_distributed("pfp compare")
    console = console or Console()
    try:
        cc = CompareConfig(
            methods=methods if methods is not None else cfg.compare.methods,
            reductions=reductions if reductions is not None else cfg.compare.reductions,
            postprocess=cfg.compare.postprocess, target=cfg.compare.target,
        )
    except ValueError as e:  # pydantic's ValidationError is a ValueError
        errs = getattr(e, "errors", lambda: [{"loc": (), "msg": str(e)}])()
        first = errs[0]
        raise ConfigError(f"compare.{'.'.join(str(p) for p in first['loc'])}: {first['msg']}") from None
    start = time.perf_counter()
    setup = prepare(cfg, console=console, progress=progress)
    out = setup.run_dir / "compare"
    out.mkdir(parents=True, exist_ok=True)

    rows: list[dict] = []
    variants = VARIANTS[cc.postprocess]
    total = len(cc.methods) * len(cc.reductions) * len(variants)
    n = 0
    for method in cc.methods:
        for shared in variants:
            for red in cc.reductions:
                n += 1
                row = compare_point(setup, cfg, method, red, console=console, progress=progress,
                                    label=f"[{n}/{total}]", shared=shared, target=cc.target)
                rows.append(row)
                save_compare(rows, setup, cfg, out, time.perf_counter() - start)  # partial results survive a crash

    paths = save_compare(rows, setup, cfg, out, time.perf_counter() - start)
    console.print(_table(rows, setup, cfg.name))
    for r in rows:
        if r.get("error"):
            _say(console, f"failed: {_label(r)} at -{r['reduction']:.1%} FLOPs: {r['error']}", style="red")
    failed = sum(1 for r in rows if r.get("error"))
    _say(
        console,
        f"{len(rows) - failed}/{len(rows)} points done" + (f", {failed} failed (see the error column)" if failed else "")
        + f"; unpruned {setup.acc:.2f}%, {_fmt_int(setup.flops)} FLOPs. "
        + f"Wrote {paths['json']}, {paths['csv']}, {paths['png']}  ({time.perf_counter() - start:.0f}s in all)",
    )
    return rows


def compare_point(
    setup: Setup, cfg: RunConfig, method: str, reduction: float, *, console: Console,
    progress: bool, label: str = "", shared: bool = True, target: str = "flops",
) -> dict:
    """One comparison point: `method` removes `reduction` of the base's FLOPs, then retrains.

    shared: with BN recalibration and reconstruction (as every method may have them); else
    plain, as the method was published. The model starts from setup.base_state() (the same
    weights for every method); a finished point is reused. A failure is returned as a row
    with its `error`, not raised.
    """
    pc = cfg.prune.model_copy(update={"method": method, "target": target, "bn_recalibration": shared,
                                      "reconstruct": shared})
    keep = round(1.0 - reduction, 10)
    extra = {"reduction": reduction, f"target_{target}_removed_pct": 100.0 * reduction,
             "target_removed_pct": 100.0 * reduction, "postprocess": "shared" if shared else "plain"}
    point = _point_dir(setup.run_dir / "compare" / ("" if target == "flops" else target), method, reduction, shared)
    key = _step_key(setup, pc, [keep], cfg.seed)
    setup.model.load_state_dict(setup.base_state())  # every method starts from the same weights
    try:
        _, row, _ = prune_and_retrain(
            setup, setup.model, pc, keep, point, key, seed=cfg.seed, console=console, progress=progress, label=label,
        )  # fmt: skip
    except Exception as e:  # noqa: BLE001 - one failing point must not end the comparison
        row = _error_row(method, target, keep, e)
        _say(console, f"      {_label(extra | {'method': method})} at -{reduction:.0%} FLOPs failed: {row['error']}", style="red")
    return row | extra


def save_compare(rows: list[dict], setup: Setup, cfg: RunConfig, out: Path, seconds: float) -> dict[str, Path]:
    paths = {"json": out / "compare.json", "csv": out / "compare.csv", "png": out / "compare.png"}
    _write_json(
        paths["json"],
        {"name": cfg.name, "base": setup.base_summary(), "rows": rows, "seconds": seconds, "config": cfg.model_dump()},
    )
    with open(paths["csv"], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k) for k in CSV_FIELDS})
    _plot(rows, setup.acc, cfg.name, paths["png"])
    return paths
